"""Stopping a training run on SIGTERM/SIGINT at a step every process agrees on.

A single process turns the signal into a flag that the training loop reads after each batch. In a
multi-process run (``jax.distributed``) a signal usually reaches one process first, or the
processes see it at different batches; a process that stopped alone would leave the others
waiting in the next collective forever. There the signal goes to JAX's preemption service instead:
``jax.distributed.initialize`` installs its own SIGTERM handler, which tells the coordination
service, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` returns True on
every process at the same step (one past the largest step any process had reached when the notice
arrived). The loop calls :meth:`Interrupt.stop_signal` after every batch; all processes then save
that step's checkpoint together and exit with 128 + 15. SIGINT (Ctrl-C) is forwarded to the
process itself as SIGTERM so that it takes the same path.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupt:
  """Context manager: installs the handlers on entry, restores the previous ones on exit.

  Args:
    synchronized: whether processes must agree on the stopping step (default: whether this run
      has more than one process). Then SIGTERM is left to JAX's preemption service and only
      SIGINT is handled here (forwarded as SIGTERM).
  """

  def __init__(self, synchronized: bool | None = None):
    self.synchronized = jax.process_count() > 1 if synchronized is None else synchronized
    self.signal: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> Interrupt:
    handled = (signal.SIGINT,) if self.synchronized else _SIGNALS
    for sig in handled:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    if self.synchronized:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_signal(self, step: int) -> int | None:
    """The signal to stop on after ``step`` (the number of batches trained), else None.

    In a synchronized run every process must call this after every batch, from the same first
    step: the preemption service counts on it.
    """
    if not self.synchronized:
      return self.signal
    if multihost_utils.reached_preemption_sync_point(step):
      return signal.SIGTERM
    return None

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
