"""Checkpoints through Orbax's CheckpointManager.

Each checkpoint holds the train state and a JSON record of where the run stands (epoch, batch
within the epoch, config fingerprint).

Why a kill never leaves a half-written checkpoint under a step's name: Orbax writes every item into
``<step>.orbax-checkpoint-tmp/<item>.orbax-checkpoint-tmp``, renames each item directory when its
data is complete, and renames the step directory last. A process killed before that last rename
leaves only ``<step>.orbax-checkpoint-tmp``, which ``all_steps`` does not list and which Orbax
removes when the resumed run saves that step again; a directory named after a step is always
complete. (Orbax's ``cleanup_tmp_directories`` option is not used: its cleanup runs in a thread
that fails noisily at exit if the process ends before its first save.)

A checkpoint that exists but cannot be read (damaged on disk: truncated or corrupted files) is
reported on one line of stderr and the next older one is used; a training run then deletes the
unreadable newer ones (``delete_unreadable``), so that it saves those steps afresh. If no
checkpoint can be read, :class:`CheckpointError` is raised and nothing is deleted, instead of
silently starting over (the usual cause is a model that changed under ``--allow_config_change``).
The tracebacks that reads abandoned by a failed restore would print are dropped (see
:func:`_dropping_abandoned_reads`), so the warning line is all that a damaged checkpoint prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

_REASON_CHARS = 200


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be read; the message lists each one's reason."""


def _dropping_abandoned_reads(previous: Callable) -> Callable:
  """An unraisable-error hook that drops the errors of reads a failed restore left in flight.

  Orbax restores inside an asyncio event loop that it closes as soon as one read fails; the
  TensorStore reads still in flight then complete into the closed loop, and each reports
  ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``: dozens of tracebacks,
  some after the restore has returned, that say nothing beyond the failure already reported.
  Exactly these are dropped; every other unraisable error goes to ``previous``.
  """

  def hook(unraisable):
    if not (
      unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
    ):
      previous(unraisable)

  return hook


def _reason(error: Exception) -> str:
  """The first sentence of an exception, shortened: enough to tell truncation from bad JSON."""
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  if ". " in first:
    first = first[: first.index(". ") + 1]
  if len(first) > _REASON_CHARS:
    first = first[:_REASON_CHARS] + "..."
  return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Checkpoints:
  """Saves and restores (state, meta) pairs under ``directory``, keeping the newest ``keep``."""

  def __init__(self, directory: str, *, keep: int = 3):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    self.directory = str(self.manager.directory)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes checkpoint ``step`` (blocking) unless it already exists."""
    if step in self.manager.all_steps():
      return
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(
    self, abstract_state: Any, *, before: int | None = None, delete_unreadable: bool = False
  ) -> tuple[int, Any, dict] | None:
    """The newest readable checkpoint as (step, state, meta), or None if there is none.

    Args:
      abstract_state: shapes, dtypes and shardings of the state (e.g. from ``jax.eval_shape``).
      before: only consider checkpoints of steps < ``before``.
      delete_unreadable: once a checkpoint has been read, delete the newer unreadable ones (a run
        that will save those steps again must, since Orbax only saves steps after the newest).

    Raises:
      CheckpointError: there are checkpoints to consider but none of them can be read.
    """
    candidates = [s for s in reversed(self.steps()) if before is None or s < before]
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _dropping_abandoned_reads(previous_hook)
    unreadable = []
    try:
      return self._restore_first_readable(candidates, abstract_state, unreadable, delete_unreadable)
    finally:
      if not unreadable:  # no read was abandoned: nothing can complete late
        sys.unraisablehook = previous_hook

  def _restore_first_readable(
    self, candidates: list[int], abstract_state: Any, unreadable: list[int], delete_unreadable: bool
  ) -> tuple[int, Any, dict] | None:
    failures = []
    for i, step in enumerate(candidates):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
          ),
        )
        state = restored["state"]
        if jax.tree.structure(state) != jax.tree.structure(abstract_state):
          raise ValueError("the state's structure differs from the model's")
      except Exception as error:  # any failure to read means this checkpoint is unusable
        unreadable.append(step)
        failures.append(f"{step} ({_reason(error)})")
        then = (
          f"falling back to checkpoint {candidates[i + 1]}"
          if i + 1 < len(candidates)
          else "no older checkpoint"
        )
        print(
          f"warning: checkpoint {step} in {self.directory} is unreadable "
          f"({_reason(error)}); {then}",
          file=sys.stderr,
          flush=True,
        )
        continue
      for damaged in unreadable if delete_unreadable else ():
        self.manager.delete(damaged)
      return step, state, dict(restored["meta"])
    if failures:
      raise CheckpointError(
        f"no checkpoint in {self.directory} can be read: {'; '.join(failures)}; if the model "
        "changed, use a new --workdir, else delete the damaged checkpoints to start over"
      )
    return None

  def close(self) -> None:
    self.manager.close()
