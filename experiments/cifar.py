"""Train and evaluate an EM-PF network.

    python -m experiments.cifar --workdir=DIR [--config=experiments/configs/cifar10.py[:VARIANT]]
        [--config.key=value ...] [--eval_only] [--allow_config_change]

Rerunning with the same workdir resumes from the newest readable checkpoint. Multi-host: started
by ``srun`` (SLURM) or ``mpirun`` (Open MPI) with more than one task, each process joins the
others by itself (``jax.distributed.initialize()`` reads the launcher's environment); elsewhere
pass --coordinator_address, --num_processes and --process_id (these win over the environment),
or --distributed=on where JAX reads the cluster itself (TPU pods). Orbax's informational logging
is off unless --verbosity is given.

Errors are one line on stderr starting with ``error:``, without a traceback. Exit codes:

* 0: trained (or evaluated) to the end; the summary is in DIR/summary.json.
* 2: the run did not start: a flag or config value that is not allowed (unknown key, bad value,
  contradicting model options; the line names the key, the value and what is allowed), a --workdir
  that is (or lies inside) a file, missing or malformed data (CIFAR missing offline without its
  archive: the line names the folder, the archive it accepts there and the configs that run
  offline), a workdir holding a run of another config (nothing in it is changed; pass
  --allow_config_change to continue it anyway), --eval_only without a checkpoint, or checkpoints
  none of which can be read.
* 3: a NaN or Inf appeared in training. The line names the global step, the time step and the
  layer where it first appeared (``non-finite value at global step 7 (epoch 1, batch 7 of 44),
  time step 1 of 4: NaN first in gradient of unit2/conv/kernel; the last good checkpoint, step 4,
  is kept in DIR/checkpoints; ...``). Only finite states are ever checkpointed; rerunning resumes
  from the last good one and meets the same fault, so change the config first.
* 4: a multi-process run lost one of its processes (it died, or gave no sign of life for
  --lost_process_timeout seconds); the line names it (``error: process 1 of 2 lost (...); ...
  restart all 2 processes with the same --workdir=DIR ...``). Restarting them all resumes from
  the newest checkpoint. When the lost process is process 0, which hosts JAX's coordination
  service, JAX aborts the others within a second with its own message ("... another task died").
* 128 + signal (143 for SIGTERM, 130 for SIGINT): stopped by the signal after checkpointing the
  batch in flight; stdout says ``stopped by signal 15 at step N; checkpoint saved, rerun with the
  same --workdir to resume``.

A damaged checkpoint is reported with one ``warning: checkpoint N ... is unreadable (...);
falling back to checkpoint M`` line on stderr, and training resumes from the older one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import peers
from experiments.cli import EXIT_NUMERICAL, EXIT_USAGE, cluster_launcher, fail, one_line

# Unknown keys are accepted here and rejected by train.validate_config, whose message names them.
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "experiments/configs/cifar10.py",
  "Training configuration file.",
  lock_config=False,
  accept_new_attributes=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints and metrics.", required=True
)
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate the newest checkpoint and exit.")
_ALLOW = flags.DEFINE_bool(
  "allow_config_change", False, "Continue a run in a workdir that holds a different config."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for multi-process training."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Multi-process start: auto joins the other processes when launched by srun (SLURM) or "
  "mpirun (Open MPI) with more than one task, or with --coordinator_address; on always calls "
  "jax.distributed.initialize() (TPU pods, other clusters JAX reads); off never does.",
)
_LOST_AFTER = flags.DEFINE_integer(
  "lost_process_timeout",
  30,
  "Multi-process runs: seconds without a sign of life from another process (a frozen or "
  "unreachable machine) after which the others end the run with exit code 4. A process that "
  "dies outright is noticed at the next collective, within seconds.",
  lower_bound=1,
)


def start_distributed(jax) -> str | None:
  """Joins the run's other processes (``jax.distributed.initialize``) when the flags or the
  launcher's environment ask for it (``--distributed``); returns how they were found (None: a
  single-process run)."""
  explicit = _COORDINATOR.value is not None
  how = (
    "--coordinator_address"
    if explicit
    else None
    if _DISTRIBUTED.value == "off"
    else cluster_launcher() or ("--distributed=on" if _DISTRIBUTED.value == "on" else None)
  )
  if how is None:
    return None
  if jax.config.jax_platforms in (None, "", "cpu"):
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Programs loaded from JAX's persistent compilation cache hang in their first gloo
    # collective on jax 0.12.1 (a 2-process run resumed from a checkpoint, with the cache its
    # first run wrote; without the cache the same run resumes and finishes; 0.10.2 is not
    # affected): multi-process CPU runs compile their programs.
    jax.config.update("jax_enable_compilation_cache", False)
  # JAX's own heartbeat timeout (default 100 s) aborts without saying what to do: it is kept
  # above --lost_process_timeout, so that experiments.peers reports a silent process first.
  heartbeat = max(100, _LOST_AFTER.value + 40)
  if explicit:
    jax.distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      heartbeat_timeout_seconds=heartbeat,
    )
  else:  # the explicit flags that are set win over what JAX reads from the environment
    jax.distributed.initialize(
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      heartbeat_timeout_seconds=heartbeat,
    )
  print(f"process {jax.process_index()} of {jax.process_count()} (started by {how})", flush=True)
  return how


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every flag or config-file error as one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    fail(one_line(str(error)), EXIT_USAGE)
  except (KeyError, AttributeError) as error:  # --config.a.b=... where config.a does not exist
    detail = error.args[0] if error.args else ""
    fail(f"a --config override names an unknown key: {one_line(str(detail))}", EXIT_USAGE)
  workdir = Path(os.path.abspath(_WORKDIR.value))
  existing = next(path for path in (workdir, *workdir.parents) if path.exists())
  if not existing.is_dir():
    fail(f"--workdir={_WORKDIR.value}: {existing} is a file, not a folder", EXIT_USAGE)
  try:
    _CONFIG.value.to_dict()  # a config file that failed to load raises on first use
  except Exception as error:  # whatever the config file raised
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    fail(f"cannot load the config file: {lines[-1] if lines else type(error).__name__}", EXIT_USAGE)
  return rest


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from empf_jax import xla_defaults  # after flag parsing, so that --help is fast

  xla_defaults.apply_cpu_defaults()  # before JAX starts its backend
  import jax

  start_distributed(jax)
  from experiments import train
  from experiments.checkpoint import CheckpointError
  from experiments.input.base import DataError

  client = peers.distributed_client() if jax.process_count() > 1 else None
  watch = (
    peers.PeerWatch(
      client, jax.process_index(), jax.process_count(), _LOST_AFTER.value, _WORKDIR.value
    )
    if client is not None
    else contextlib.nullcontext()
  )
  with watch:
    try:
      summary = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, eval_only=_EVAL_ONLY.value, allow_config_change=_ALLOW.value
      )
    except (train.ConfigError, DataError, CheckpointError) as error:
      fail(one_line(str(error)), EXIT_USAGE)
    except train.NumericalError as error:
      fail(str(error), EXIT_NUMERICAL)
    except Exception as error:
      # In a multi-process run a failure is first checked against the other processes' beats:
      # a collective with a dead peer fails at once, and the exit would then wait for it.
      lost = watch.lost() if client is not None else []
      if lost:
        watch.give_up(lost, f"a collective failed: {one_line(str(error))[:300]}", report=True)
      raise
  return train.exit_code(summary)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
