"""The dispatch bound (empf_jax.dispatch): steps in flight, one-program sums, and the loop that
deadlocks XLA's CPU client without the bound, run through the helper on 2 host devices."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from empf_jax import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Step:
  """A stand-in for a dispatched step's result that records when it is waited for."""

  def __init__(self, index, log):
    self.index, self.log = index, log

  def block_until_ready(self):
    self.log.append(self.index)
    return self


def test_in_flight_waits_for_the_oldest_step_only():
  waited = []
  inflight = dispatch.InFlight(depth=2)
  assert inflight.push(_Step(0, waited)) == []
  for i in range(1, 5):
    done = inflight.push(_Step(i, waited))
    assert [d.index for d in done] == [i - 1]  # step i-1 finished before step i+1 is dispatched
    assert len(inflight) == 1
  assert [d.index for d in inflight.drain()] == [4]
  assert waited == [0, 1, 2, 3, 4] and len(inflight) == 0


def test_in_flight_depth_three_keeps_two_pending():
  waited = []
  inflight = dispatch.InFlight(depth=3)
  for i in range(6):
    inflight.push(_Step(i, waited))
    assert len(inflight) == min(i + 1, 2)
  assert waited == [0, 1, 2, 3]


@pytest.mark.parametrize("depth", [0, -1, 1.5, "2"])
def test_in_flight_rejects_a_bad_depth(depth):
  with pytest.raises(ValueError, match=f"depth={depth!r} is not allowed; allowed: an integer"):
    dispatch.InFlight(depth=depth)


def test_accumulate_is_one_program_for_every_leaf():
  tree = {"a": jnp.arange(3.0), "b": (jnp.float32(2.0), jnp.int32(1))}
  assert dispatch.accumulate(None, tree) is tree
  before = dispatch._add._cache_size()
  total = tree
  for _ in range(4):
    total = dispatch.accumulate(total, tree)
  assert dispatch._add._cache_size() == before + 1
  chex.assert_trees_all_close(total, jax.tree.map(lambda v: 5 * v, tree))


# The loop of a data-parallel evaluation: a jitted step with a batch-sharded input, replicated
# outputs and one all-gather, its outputs summed, several hundred times. Without a bound on the
# steps in flight this aborts XLA's CPU client on 2 host devices after 40 s ("Termination timeout
# for all gather"); through dispatch.InFlight it finishes in seconds.
_LOOP = """
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from empf_jax import dispatch
steps, depth = int(sys.argv[1]), int(sys.argv[2])
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

def step(w, x):
  x = jnp.broadcast_to(x, (4,) + x.shape).reshape((-1,) + x.shape[1:])  # [4B], gathers B
  h = jnp.tanh(x @ w)
  for _ in range(8):
    h = jnp.tanh(h @ w)
  return {"sum": jnp.sum(h), "per_unit": jnp.sum(h, 0)}

step = jax.jit(step, in_shardings=(replicated, batch), out_shardings=replicated)
w = jax.device_put(jnp.eye(512) * 0.5, replicated)
xs = [jax.device_put(jnp.ones((256, 512)) * i / 8, batch) for i in range(8)]
assert "all-gather(" in step.lower(w, xs[0]).compile().as_text()
total, inflight = None, dispatch.InFlight(depth)
for i in range(steps):
  total = dispatch.accumulate(total, step(w, xs[i % 8]))
  inflight.push(total)
print("finished", float(jax.device_get(total)["sum"]), flush=True)
"""


def test_collective_loop_through_the_helper_finishes_on_two_host_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _LOOP, "400", "2"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  x = np.ones((256, 512), np.float32) * np.arange(8, dtype=np.float32)[:, None, None] / 8
  h = np.tanh(x * 0.5)
  for _ in range(8):
    h = np.tanh(h * 0.5)
  expected = 4 * 50 * h.sum()  # 400 steps = 50 passes over the 8 inputs, each folded 4 times
  assert float(result.stdout.split()[-1]) == pytest.approx(expected, rel=1e-4)
