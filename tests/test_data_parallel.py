"""Data parallelism all the way down: every compiled step keeps the batch split over the devices.

Each step is compiled for the mesh the training program uses (all 8 host devices of the test
session) and read back as HLO: parameters' gradient and BatchNorm-statistics reductions
(all-reduce) are expected; an all-gather would mean that every device computes the whole
global batch.
"""

import functools
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from empf_jax import deploy, models, ops, testing
from experiments import train
from experiments.configs import digits

_COLLECTIVE = re.compile(
  r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
  r"(?:-start)?\("
)


def collectives(hlo: str) -> dict[str, int]:
  """{collective kind: count} of a compiled program's HLO text."""
  counts: dict[str, int] = {}
  for match in _COLLECTIVE.finditer(hlo):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def test_collectives_reads_hlo_lines():
  hlo = (
    "%a = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}\n"
    "%b = (f32[4]{0}, f32[]) all-reduce(f32[4]{0} %x, f32[] %y), to_apply=%sum\n"
    "%c = f32[4]{0} all-reduce-start(f32[4]{0} %z)\n"
  )
  assert collectives(hlo) == {"all-gather": 1, "all-reduce": 2}


@functools.cache
def _trainer(mode):
  """The training program's trainer for the digits config with rule ``mode`` (a narrow net)."""
  config = digits.get_config()
  config.mode = mode
  config.model.width = 0.25
  return train.Trainer(config, tempfile.mkdtemp())


def _batch(trainer):
  x, y = trainer.batch(1)
  return trainer.global_batch(x, y.astype(np.int32))


@pytest.mark.parametrize("mode", ["online", "random_step", "bptt"])
def test_train_step_reduces_gradients_and_gathers_nothing(mode):
  trainer = _trainer(mode)
  assert jax.device_count() == 8 and trainer.mesh.size == 8
  x, y = _batch(trainer)
  hlo = (
    trainer._train_step.lower(
      trainer.state,
      x,
      y,
      jnp.float32(0.1),
      trainer.seed_key,
    )
    .compile()
    .as_text()
  )
  found = collectives(hlo)
  assert found.get("all-reduce", 0) > 0, found
  assert set(found) == {"all-reduce"}, found


def test_eval_and_reestimation_steps_gather_nothing():
  trainer = _trainer("online")  # the two steps do not depend on the rule
  x, y = _batch(trainer)
  mask = trainer.global_batch(np.ones(y.shape, np.float32))[0]
  eval_hlo = trainer._eval_step.lower(trainer.state, x, y, mask).compile().as_text()
  recal_hlo = trainer._recalibrate_step.lower(trainer.state, x).compile().as_text()
  assert set(collectives(eval_hlo)) == {"all-reduce"}, collectives(eval_hlo)  # the batch totals
  assert set(collectives(recal_hlo)) == {"all-reduce"}, collectives(recal_hlo)  # the statistics


def _mesh():
  return jax.make_mesh(
    (2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2]
  )


def test_fold_time_keeps_the_batch_split_and_equals_the_plain_fold():
  mesh = _mesh()
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 5, 2))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  conv = lambda y: ops.conv2d(y, kernel, 1, 1)
  plain = conv(x.reshape((12, 5, 5, 2))).reshape((3, 4, 5, 5, 6))

  def folded(x):
    return ops.fold_time(x, conv)

  split = NamedSharding(mesh, P(None, "data"))
  step = jax.jit(folded, in_shardings=split, out_shardings=split)
  with jax.set_mesh(mesh):
    assert ops.batch_shards(4) == 2 and ops.batch_shards(3) == 1
    hlo = step.lower(x).compile().as_text()
    got = step(jax.device_put(x, split))
  assert "all-gather" not in collectives(hlo)
  np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)
  assert ops.batch_shards(4) == 1  # no mesh set: the plain fold
  np.testing.assert_array_equal(
    jax.jit(folded)(x),
    jax.jit(lambda x: conv(x.reshape((12, 5, 5, 2))).reshape((3, 4, 5, 5, 6)))(x),
  )


def test_early_exit_runtime_gathers_nothing():
  options = dict(num_classes=10, time_steps=4, in_channels=1, width=0.25)
  model = models.create("convnet_small", **options, rngs=nnx.Rngs(0))
  testing.randomize(model, jax.random.key(1), kernels=True)
  deployed = deploy.deploy(model, "convnet_small", **options)
  rule = deploy.ExitRule.parse("margin:0.5")
  mesh = _mesh()
  split = NamedSharding(mesh, P(None, "data"))
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 8, 1))
  run = jax.jit(lambda x: deploy.run_early_exit(deployed, x, rule).predictions, in_shardings=split)
  with jax.set_mesh(mesh):
    hlo = run.lower(x).compile().as_text()
  assert "all-gather" not in collectives(hlo), collectives(hlo)
