"""Train and evaluate an EM-PF network.

    python -m experiments.cifar --workdir=DIR [--config=experiments/configs/cifar10.py[:VARIANT]]
        [--config.key=value ...] [--eval_only] [--allow_config_change]

Rerunning with the same workdir resumes from the newest checkpoint. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or set them in the environment that
``jax.distributed.initialize`` reads).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/cifar10.py", "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                               required=True)
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate the newest checkpoint and exit.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False,
                           "Continue a run in a workdir that holds a different config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process training.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")


def main(argv):
  del argv
  import jax  # after flag parsing, so that --help is fast
  if _COORDINATOR.value is not None:
    if jax.config.jax_platforms in (None, "", "cpu"):
      # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from experiments import train
  from experiments.input.base import DataError
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, eval_only=_EVAL_ONLY.value,
                                       allow_config_change=_ALLOW.value)
  except (train.ConfigError, DataError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return train.exit_code(summary)


if __name__ == "__main__":
  app.run(main)
