"""What the command-line programs share: exit codes, the one-line ``error:`` message and the
multi-process launch read from the environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NoReturn

EXIT_USAGE = 2  # the run did not start: a bad flag, config value, data or workdir
EXIT_NUMERICAL = 3  # a NaN or Inf in training


def one_line(text: str) -> str:
  """A multi-line message on one line; for an embedded traceback, its first and last lines."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0], lines[-1]]
  return " ".join(lines)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
  """Prints ``error: <message>`` on stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


# The variables by which JAX's jax.distributed.initialize() recognizes a launch with no
# arguments, and the one that counts the launch's processes.
_LAUNCHERS = {
  "SLURM (srun)": (
    ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "SLURM_NTASKS",
  ),
  "Open MPI (mpirun)": (
    ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    "OMPI_COMM_WORLD_SIZE",
  ),
}


def cluster_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """The launcher that started this process as one of several, read from its environment:
  ``"SLURM (srun)"`` or ``"Open MPI (mpirun)"``; None outside them or for a single task (an
  ``sbatch`` shell or ``srun -n 1`` stays a single-process run)."""
  environ = os.environ if environ is None else environ
  for name, (variables, count) in _LAUNCHERS.items():
    if all(v in environ for v in variables):
      try:
        if int(environ[count]) > 1:
          return name
      except ValueError:
        fail(f"{count}={environ[count]!r} is not a number of processes", EXIT_USAGE)
  return None
