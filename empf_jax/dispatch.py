"""Loops over batches that dispatch one program per step with a bounded number in flight.

JAX dispatches asynchronously: a Python loop that calls a jitted step once per batch returns
before the device has run it, so without a wait the loop queues every batch's program. That
overlaps input preparation with compute, but the queue must stay short. XLA's CPU client runs each
device's share of a program on one shared thread pool (max(cores, devices) threads) and a launch
first takes one of 32 in-flight slots per device, blocking its pool thread when none is free. With
more than ~32 programs queued behind one that holds a collective, one pool thread blocks in that
launch while the other waits in the collective for a device share that never gets a thread: the
rendezvous times out after 40 s and the process aborts ("Termination timeout for all gather").
Seen on 2 and 4 host devices with the library's evaluation loop (one program per batch plus one
eager add per leaf of its totals); a jitted step with one all-gather called 300 times in a loop
aborts the same way, and finishes when each iteration waits for the one before
(``tests/test_dispatch.py`` runs that pattern through :class:`InFlight`).

So every loop here keeps at most ``depth`` steps in flight (:class:`InFlight`; 2 by default:
step i+1 is dispatched once step i-1 has finished, so the host prepares the next batch while
the device runs the current one) and sums its per-step results with one jitted program
(:func:`accumulate`), never with eager per-leaf operations.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def _add(total: Any, new: Any) -> Any:
  return jax.tree.map(jnp.add, total, new)


def accumulate(total: Any, new: Any) -> Any:
  """``total + new`` leaf by leaf, as one compiled program (``new`` when ``total`` is None).

  Both are pytrees of arrays with the same structure; the sum stays on the device.
  """
  return new if total is None else _add(total, new)


class InFlight:
  """At most ``depth`` dispatched steps not yet finished.

  Call :meth:`push` with a step's results right after dispatching it: it waits for the oldest
  steps until ``depth - 1`` remain, so the next dispatch makes ``depth``. Results are any pytree
  (non-array leaves such as step numbers ride along); what was waited for is returned, oldest
  first, ready to be read without blocking.
  """

  def __init__(self, depth: int = 2):
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f"depth={depth!r} is not allowed; allowed: an integer >= 1")
    self.depth = depth
    self._pending: collections.deque = collections.deque()

  def push(self, results: Any) -> list[Any]:
    """Registers a dispatched step; returns the steps it waited for (finished), oldest first."""
    self._pending.append(results)
    done = []
    while len(self._pending) > self.depth - 1:
      done.append(jax.block_until_ready(self._pending.popleft()))
    return done

  def drain(self) -> list[Any]:
    """Waits for every pending step; returns them, oldest first."""
    done = [jax.block_until_ready(r) for r in self._pending]
    self._pending.clear()
    return done

  def __len__(self) -> int:
    return len(self._pending)
