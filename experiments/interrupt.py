"""Stopping a training run on SIGTERM/SIGINT at a step every process agrees on, and at once on a
second signal.

A single process turns the signal into a flag that the training loop reads after each batch. In a
multi-process run (``jax.distributed``) a signal usually reaches one process first, or the
processes see it at different batches; a process that stopped alone would leave the others
waiting in the next collective forever. There the signal goes to JAX's preemption service instead:
``jax.distributed.initialize`` installs its own SIGTERM handler (C++), which tells the coordination
service, and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` returns True on
every process at the same step (one past the largest step any process had reached when the notice
arrived). The loop calls :meth:`Interrupt.stop_signal` after every batch; all processes then save
that step's checkpoint together and exit with 128 + 15. SIGINT (Ctrl-C) is forwarded to JAX's
handler as a SIGTERM so that it takes the same path.

A second SIGTERM or SIGINT ends the process at once, with exit code 128 + signal and without a
checkpoint (the newest one is kept): the first may wait for a batch that never finishes (a lost
peer, a stuck device). Python runs its signal handlers only between bytecodes of the main thread,
which may be blocked in JAX, so the signals are counted by a thread woken through
:func:`signal.set_wakeup_fd`. JAX's handler would swallow every SIGTERM after its first; in a
multi-process run this module therefore owns SIGTERM too and calls JAX's handler itself for the
first one (read with the C library's ``signal``; if it cannot be read, SIGTERM stays with JAX
and only a second SIGINT ends the process at once).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _take_c_handler(signum: int):
  """The C signal handler installed for ``signum`` (JAX's preemption notifier), replaced by
  SIG_IGN until Python installs its own; None where there is none to call."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
  address = libc.signal(signum, ctypes.c_void_p(int(signal.SIG_IGN)))
  if address == ctypes.c_void_p(-1).value:  # SIG_ERR: nothing was changed
    return None
  if address in (None, int(signal.SIG_IGN)):  # SIG_DFL (NULL) or SIG_IGN: nothing to call
    libc.signal(signum, ctypes.c_void_p(address))
    return None
  return libc, address


class Interrupt:
  """Context manager: installs the handlers on entry, restores the previous ones on exit.

  Args:
    synchronized: whether processes must agree on the stopping step (default: whether this run
      has more than one process). Then the first signal goes to JAX's preemption service.
  """

  def __init__(self, synchronized: bool | None = None):
    self.synchronized = jax.process_count() > 1 if synchronized is None else synchronized
    self.signal: int | None = None
    self._previous: dict[int, object] = {}
    self._jax_sigterm = None  # (libc, address) of JAX's SIGTERM handler, while we own SIGTERM
    self._pipe: tuple[int, int] | None = None
    self._previous_wakeup = -1
    self._thread: threading.Thread | None = None

  def __enter__(self) -> Interrupt:
    handled = _SIGNALS
    if self.synchronized:
      self._jax_sigterm = _take_c_handler(signal.SIGTERM)
      if self._jax_sigterm is None:  # SIGTERM stays with JAX
        handled = (signal.SIGINT,)
    for sig in handled:
      self._previous[sig] = signal.signal(sig, self._handle)
    read, write = os.pipe()
    os.set_blocking(write, False)
    self._pipe = (read, write)
    self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._count, name="signals", daemon=True)
    self._thread.start()
    return self

  def _handle(self, signum, frame):
    """Python's handler: it only has to exist (the counting thread acts on each signal)."""
    del signum, frame

  def _count(self) -> None:
    """Reads the signal numbers the wakeup fd receives; a zero byte ends the thread."""
    while True:
      data = os.read(self._pipe[0], 64)
      for signum in data:
        if signum == 0:
          return
        if signum not in _SIGNALS:
          continue
        if self.signal is not None:
          print(
            f"\nstopped by a second signal ({signum}): leaving now without a checkpoint; "
            "rerun with the same --workdir to resume from the newest one",
            file=sys.stderr,
            flush=True,
          )
          os._exit(128 + signum)
        self.signal = signum
        if self.synchronized:
          self._notify_jax()

  def _notify_jax(self) -> None:
    """Hands the first signal to JAX's preemption service."""
    if self._jax_sigterm is not None:
      _, address = self._jax_sigterm
      _HANDLER(address)(signal.SIGTERM)
    else:  # a SIGINT, while SIGTERM is JAX's
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
    signal.set_wakeup_fd(self._previous_wakeup)
    os.write(self._pipe[1], b"\0")
    self._thread.join()
    for fd in self._pipe:
      os.close(fd)
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()
    if self._jax_sigterm is not None:  # JAX's handler back, for a later Interrupt
      libc, address = self._jax_sigterm
      libc.signal(signal.SIGTERM, ctypes.c_void_p(address))
      self._jax_sigterm = None
