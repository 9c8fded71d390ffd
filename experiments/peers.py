"""Ending a multi-process run in bounded time, with one line, when one of its processes is lost.

A process of a ``jax.distributed`` run that dies (``kill -9``, out of memory, a lost machine)
leaves the others in their next collective. What JAX does then, measured with 2 processes on
jax 0.10.2 and 0.12.1:

* the lost process is not process 0: the survivors' collective fails at once (gloo: "Connection
  reset by peer") and the exception ends Python, but the exit then waits in
  ``jax.distributed.shutdown``'s barrier until the coordination service's heartbeat timeout
  (100 s) declares the process dead and aborts the survivor with a C++ stack dump (80-90 s);
* the lost process is process 0, which hosts the coordination service: every survivor is aborted
  within a second by JAX itself ("Terminating process because the JAX distributed service detected
  fatal errors. This most likely indicates that another task died"). Nothing in Python runs
  before that abort (the client's callback for it cannot be set from Python), so that message is
  the one line there;
* a process that stops without closing its connections (a frozen or unreachable machine): the
  collectives wait, and only the heartbeat timeout ends the run.

:class:`PeerWatch` covers the first and the last case. Every process counts a beat in the
distributed key-value store every second, and a thread watches the beat of the next process
(a ring: the store's load grows with the number of processes, not its square). A watcher that
sees no beat for ``timeout_s`` seconds reports the process lost in the store, where every
process's thread reads it within a beat. Each survivor then prints one ``error:`` line naming the
lost process and saying to restart all processes with the same workdir, and leaves at once
(exit code :data:`EXIT_PEER_LOST`) without waiting for the shutdown barrier. A failure raised in
a multi-process run (the collective that noticed a dead peer) is checked against all beats first,
so that it is reported the same way without waiting for the timeout. The collective does not
always fail: with 2 processes of 2 CPU devices, after ``kill -9`` of process 1 the survivor's step
waited without an error in 3 runs of 4, so the watch is what ends those runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

EXIT_PEER_LOST = 4  # another process of a multi-process run was lost; restart them all
_PREFIX = "empf_jax/beat/"
_LOST = "empf_jax/lost"  # "I,J:why", set by the process that found I and J lost
_DONE = "done"  # a process that left the run on its own (finished, stopped by a signal, failed)


def distributed_client():
  """The client of ``jax.distributed``'s key-value store, or None outside a distributed run."""
  from jax._src import distributed

  return getattr(distributed.global_state, "client", None)


class PeerWatch:
  """Beats of this process and a watch over the others' (see the module docstring).

  Args:
    client: the distributed key-value store (:func:`distributed_client`).
    process_index: this process.
    process_count: the processes of the run.
    timeout_s: seconds without a beat of another process after which this one gives up the run.
      Keep it below ``jax.distributed``'s heartbeat timeout, which aborts without the line.
    workdir: named in the message (where the run resumes from).
    beat_s: seconds between beats.
  """

  def __init__(
    self,
    client,
    process_index: int,
    process_count: int,
    timeout_s: float,
    workdir: str,
    beat_s: float = 1.0,
  ):
    self.client = client
    self.index = process_index
    self.count = process_count
    self.timeout_s = timeout_s
    self.workdir = workdir
    self.beat_s = beat_s
    self._beats = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

  def __enter__(self) -> PeerWatch:
    self._beat()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    """Leaving normally (or on an error that is not a lost peer): the others stop watching us."""
    self._stop.set()
    self._thread.join()
    with contextlib.suppress(Exception):  # the store may have left with process 0
      self.client.key_value_set(_PREFIX + str(self.index), _DONE, allow_overwrite=True)

  def _beat(self) -> None:
    self._beats += 1
    self.client.key_value_set(_PREFIX + str(self.index), str(self._beats), allow_overwrite=True)

  def _get(self, key: str) -> str | None:
    """The store's value of ``key``; None while it is not set."""
    try:
      return self.client.key_value_try_get(key)
    except Exception:  # NOT_FOUND
      return None

  def _read(self, others) -> dict[int, str | None]:
    """The beats of ``others`` (None: none yet)."""
    return {other: self._get(_PREFIX + str(other)) for other in others}

  def _run(self) -> None:
    """Each process watches the next one (a ring: one read per beat and process, however many
    processes) and reads the key where a watcher reports a lost process."""
    watched = (self.index + 1) % self.count
    seen, changed = self._get(_PREFIX + str(watched)), time.monotonic()
    while not self._stop.wait(self.beat_s):
      try:
        self._beat()
        now, beat, reported = time.monotonic(), self._get(_PREFIX + str(watched)), self._get(_LOST)
      except Exception as error:
        self.give_up([0], f"the distributed key-value store it hosts is unreachable ({error})")
      if reported is not None:
        lost, why = reported.split(":", 1)
        self.give_up([int(i) for i in lost.split(",")], why)
      if beat != seen or beat == _DONE:
        seen, changed = beat, now
      elif now - changed > self.timeout_s:
        self.give_up([watched], f"no sign of life for {self.timeout_s:g} s", report=True)

  def lost(self, wait_s: float | None = None) -> list[int]:
    """The processes whose beat does not move within ``wait_s`` (default: 3 beats)."""
    wait_s = 3 * self.beat_s if wait_s is None else wait_s
    others = [i for i in range(self.count) if i != self.index]
    try:
      before = self._read(others)
      time.sleep(wait_s)
      after = self._read(others)
    except Exception:  # the store went with process 0
      return [0]
    return [other for other in others if before[other] == after[other] != _DONE]

  def give_up(self, lost: list[int], why: str, report: bool = False) -> None:
    """Prints the one line and leaves at once, skipping ``jax.distributed.shutdown``'s barrier
    (it would wait for the lost process until JAX aborts); with ``report``, tells the other
    processes first."""
    names = ",".join(str(i) for i in lost)
    if report:
      with contextlib.suppress(Exception):  # if not, the others learn it from JAX
        self.client.key_value_set(_LOST, f"{names}:{why}", allow_overwrite=True)
      if self.index == 0:  # the store leaves with process 0: let the others read the report
        time.sleep(2 * self.beat_s)
    which = f"process {names}" if len(lost) == 1 else f"processes {names}"
    print(
      f"error: {which} of {self.count} lost ({why}); this run cannot continue without it: "
      f"restart all {self.count} processes with the same --workdir={self.workdir} to resume "
      f"from its newest checkpoint",
      file=sys.stderr,
      flush=True,
    )
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)
