"""Checkpoints through Orbax's CheckpointManager.

Each checkpoint holds the train state and a JSON record of where the run stands (epoch, batch
within the epoch, config fingerprint). Orbax writes into a temporary directory and renames it when
complete, so a kill never leaves a half-written checkpoint under a step's name. A checkpoint that
exists but cannot be read (damaged on disk) is reported and the next older one is used.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
  """Saves and restores (state, meta) pairs under ``directory``, keeping the newest ``keep``."""

  def __init__(self, directory: str, *, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes checkpoint ``step`` (blocking) unless it already exists."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """The newest readable checkpoint as (step, state, meta), or None if there is none.

    ``abstract_state`` gives shapes, dtypes and shardings (e.g. from ``jax.eval_shape``).
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as error:  # any failure to read means this checkpoint is unusable
        log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                    step, self.manager.directory, type(error).__name__, error)
        print(f"warning: checkpoint {step} is unreadable ({type(error).__name__}); "
              "falling back to the previous one", flush=True)
        continue
      state = restored["state"]
      if jax.tree.structure(state) != jax.tree.structure(abstract_state):
        raise ValueError(f"checkpoint {step} does not match the model's state structure")
      return step, state, dict(restored["meta"])
    return None

  def close(self) -> None:
    self.manager.close()
