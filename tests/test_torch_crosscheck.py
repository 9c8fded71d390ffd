"""Cross-check against the PyTorch reference (benchmarks/torch_reference.py) and the converters.

The same weights (converted with empf_jax.convert), randomised neuron scalars and BatchNorm state
and the same input must give the same logits at every step in evaluation and training mode, and
the same parameters after one batch of online / random-step / BPTT training with the training
engine of empf_jax.training on the JAX side and the usual eager PyTorch loop on the other.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import convert, layers, models, testing, training

torch = pytest.importorskip("torch")
from benchmarks import torch_reference as ref  # noqa: E402  (needs torch)

T, BATCH, CLASSES, SIZE, WIDTH = 2, 4, 10, 16, 1 / 8
ATOL = 1e-4
BASE = dict(name="resnet18")
VARIANT = dict(name="resnet19", weights="ternary", mem_bn=True, parallel=True, seca=2)
# 4-bit spikes are left out of the numerical comparison: a last-bit difference at a rounding
# boundary legitimately changes a spike by 1/4.
CONVNET28 = dict(name="convnet28", in_channels=3)
CONFIGS = [
  pytest.param(BASE, id="resnet18"),
  pytest.param(VARIANT, id="resnet19-variants", marks=pytest.mark.slow),
  pytest.param(CONVNET28, id="convnet28"),
]
# convnet28 flattens the 7x7 maps of 28x28 inputs into its classifier.
SIZES = {"convnet28": 28}


def _draw(rng: np.random.Generator, variable: nnx.Variable) -> np.ndarray:
  """Latent quantised weights of both signs, mostly small, 2 % beyond the clip range |W| > 1
  (where the straight-through gradient is 0); float kernels Kaiming-normal (fan_out), FC and
  SECA weights uniform; the rest is left to testing.randomize."""
  shape = variable.shape
  if isinstance(variable, (layers.BinaryWeight, layers.TernaryWeight)):
    w = rng.normal(0.0, 0.05, shape)
    far = rng.random(shape) < 0.02
    w[far] = 1.2 * np.sign(w[far])
    return w
  if isinstance(variable, layers.FloatWeight):
    if len(shape) == 4:
      return rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape)
    bound = 1.0 / np.sqrt(shape[0] if len(shape) == 2 else layers.SECA_TAPS)
    return rng.uniform(-bound, bound, shape)
  return np.zeros(shape)


def _build(name: str, seed: int = 0, **options) -> nnx.Module:
  """A network with random values everywhere; built abstractly and filled from numpy, which
  avoids compiling every initialiser."""
  model = nnx.eval_shape(
    lambda: models.create(name, num_classes=CLASSES, time_steps=T, width=WIDTH, **options)
  )
  rng = np.random.default_rng(seed)
  for _, variable in sorted(nnx.iter_graph(model), key=lambda item: str(item[0])):
    if isinstance(variable, nnx.Variable):
      variable.set_value(jnp.asarray(_draw(rng, variable), variable.dtype))
  return testing.randomize(model, jax.random.key(seed))


@functools.cache
def _randomized(config: tuple) -> nnx.Module:
  return _build(**dict(config), seed=1)


def _pair(config: dict) -> tuple[nnx.Module, ref.SpikingResNet]:
  """A randomised JAX network and the PyTorch reference holding the same values."""
  model = nnx.clone(_randomized(tuple(sorted(config.items()))))
  options = {k: v for k, v in config.items() if k != "name"}
  torch_model = ref.create(
    config["name"], num_classes=CLASSES, time_steps=T, width=WIDTH, **options
  )
  state = convert.to_torch_state_dict(model)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return model, torch_model


def _batch(seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(BATCH, size, size, 3)).astype(np.float32)
  return images, rng.integers(0, CLASSES, BATCH)


def _time_major(images: np.ndarray) -> tuple[jax.Array, torch.Tensor]:
  """The same direct-encoded input, [T, B, H, W, C] for JAX and [T, B, C, H, W] for PyTorch."""
  nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  x = jnp.broadcast_to(jnp.asarray(images)[None], (T,) + images.shape)
  return x, ref.repeat_static(nchw, T)


@functools.partial(nnx.jit, static_argnames=("train",))
def _logits(model, x, train):
  return model(x, train=train)


def _torch_train_logits(torch_model: ref.SpikingResNet, x: torch.Tensor) -> np.ndarray:
  torch_model.train()
  torch_model.reset()
  with torch.no_grad():
    logits = torch.stack([torch_model(x_t) for x_t in x])
  torch_model.reset()
  return logits.numpy()


def _assert_same_state(model: nnx.Module, torch_model: ref.SpikingResNet, atol: float) -> None:
  mine = convert.to_torch_state_dict(model)
  theirs = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert mine.keys() == theirs.keys()
  for key, value in theirs.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_allclose(mine[key], value, atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_logits_match_at_every_step(config):
  model, torch_model = _pair(config)
  x, x_torch = _time_major(_batch(size=SIZES.get(config["name"], SIZE))[0])
  logits = np.asarray(_logits(model, x, train=False))
  expected = ref.run_eval(torch_model, x_torch).numpy()
  chex.assert_shape(logits, (T, BATCH, CLASSES))
  assert np.std(expected) > 1e-2  # a network that outputs constants would match trivially
  np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", CONFIGS)
def test_train_mode_logits_and_running_stats_match(config):
  """Batch statistics of each step's batch; running averages updated once per step in order."""
  model, torch_model = _pair(config)
  x, x_torch = _time_major(_batch(size=SIZES.get(config["name"], SIZE))[0])
  logits = np.asarray(_logits(model, x, train=True))
  np.testing.assert_allclose(logits, _torch_train_logits(torch_model, x_torch), atol=ATOL, rtol=0)
  _assert_same_state(model, torch_model, ATOL)


def _train_jax(
  model: nnx.Module, images: np.ndarray, labels: np.ndarray, mode: str, seed_key: jax.Array
) -> nnx.Module:
  optimizer = training.make_optimizer()
  graphdef, state = training.create_train_state(model, optimizer)
  step = jax.jit(
    training.make_train_step(
      graphdef, optimizer, training.StepConfig(mode=mode, time_steps=T, num_classes=CLASSES)
    )
  )
  state, _ = step(state, jnp.asarray(images), jnp.asarray(labels), jnp.float32(0.01), seed_key)
  return training.merge(graphdef, state)


@pytest.mark.parametrize(
  "mode",
  [
    "online",
    pytest.param("random_step", marks=pytest.mark.slow),
    pytest.param("bptt", marks=pytest.mark.slow),
  ],
)
def test_one_training_batch_gives_the_same_parameters(mode):
  """T online updates (or one random-step / BPTT update) of SGD + Nesterov + coupled L2."""
  model, torch_model = _pair(BASE)
  images, labels = _batch(1)
  seed_key = jax.random.key(0)  # draws t* = 1 (0-based): the gradient-free prefix runs
  trained = _train_jax(model, images, labels, mode, seed_key)

  optimizer = ref.make_optimizer(torch_model)
  _, x_torch = _time_major(images)
  y = torch.from_numpy(labels)
  if mode == "online":
    ref.online_step(torch_model, optimizer, x_torch, y)
  elif mode == "random_step":
    t_star = int(training.draw_time_step(seed_key, jnp.int32(0), T))
    assert t_star == T - 1
    ref.random_step(torch_model, optimizer, x_torch, y, t_star)
  else:
    ref.bptt_step(torch_model, optimizer, x_torch, y)

  before = convert.to_torch_state_dict(model)
  after = convert.to_torch_state_dict(trained)
  moved = max(np.abs(after[k] - before[k]).max() for k in before)
  assert moved > 10 * ATOL  # the update is large enough for the comparison to mean something
  _assert_same_state(trained, torch_model, ATOL)


def test_torch_checkpoint_loads_into_jax(tmp_path):
  """torch.save -> torch.load -> load_torch_state_dict gives the same values and logits."""
  model, torch_model = _pair(BASE)
  path = tmp_path / "reference.pt"
  torch.save(torch_model.state_dict(), path)
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  fresh = convert.load_torch_state_dict(
    _build(**BASE, seed=3), {k: v.numpy() for k, v in loaded.items()}
  )
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh), nnx.state(model))
  x, x_torch = _time_major(_batch(2)[0])
  logits = np.asarray(_logits(fresh, x, train=False))
  np.testing.assert_array_equal(logits, np.asarray(_logits(model, x, train=False)))
  np.testing.assert_allclose(logits, ref.run_eval(torch_model, x_torch).numpy(), atol=ATOL, rtol=0)


def _hd_lif_resnet18_keys() -> dict[str, tuple[int, ...]]:
  """The authors' resnet18 (hzc1208/HD_LIF resnet.py, modules.py) at width 1/8, T = 2: stem
  conv1/bn1, layer<s>.<j> blocks with act1/act2 (OnlineNeuron: alpha, v_th), conv<k> =
  Sequential(BinaryConv, BatchNorm2d), downsample = Sequential(conv1x1, BatchNorm2d), fc."""
  keys = {"conv1.weight": (8, 3, 3, 3), "fc.weight": (10, 64), "fc.bias": (10,)}

  def bn(prefix, c):
    keys.update(
      {f"{prefix}.{leaf}": (c,) for leaf in ("weight", "bias", "running_mean", "running_var")}
    )
    keys[f"{prefix}.num_batches_tracked"] = ()

  bn("bn1", 8)
  cin = 8
  for stage, cout in enumerate((8, 16, 32, 64), start=1):
    for j in range(2):
      block = f"layer{stage}.{j}"
      for act in ("act1", "act2"):
        keys[f"{block}.{act}.alpha"] = keys[f"{block}.{act}.v_th"] = (T,)
      keys[f"{block}.conv1.0.weight"] = (cout, cin if j == 0 else cout, 3, 3)
      keys[f"{block}.conv2.0.weight"] = (cout, cout, 3, 3)
      bn(f"{block}.conv1.1", cout)
      bn(f"{block}.conv2.1", cout)
      if j == 0 and stage > 1:
        keys[f"{block}.downsample.0.weight"] = (cout, cin, 1, 1)
        bn(f"{block}.downsample.1", cout)
    cin = cout
  return keys


def test_hd_lif_layout_names_the_authors_resnet18():
  model = _build(**BASE)
  exported = convert.to_torch_state_dict(model, layout="hd_lif")
  assert {k: v.shape for k, v in exported.items()} == _hd_lif_resnet18_keys()
  assert convert.expected_keys(model, layout="hd_lif") == {
    k: v for k, v in _hd_lif_resnet18_keys().items() if not k.endswith("num_batches_tracked")
  }


def test_hd_lif_layout_names_options_and_other_networks():
  resnet19 = convert.to_torch_state_dict(_build(**VARIANT), layout="hd_lif")
  for key in (
    "layer2.0.downsample.0.weight",
    "layer2.0.act1.bn_ratio",
    "layer2.0.act1.mem_ratio",
    "layer2.0.act1.bn.1.running_var",
    "layer2.0.attn2.conv.bias",
    "layer4.1.act2.v_th",
    "fc.0.weight",
    "fc.1.alpha",
    "fc.2.bias",
  ):
    assert key in resnet19, key
  assert resnet19["layer2.0.attn1.conv.weight"].shape == (1, 1, 5)
  np.testing.assert_array_equal(resnet19["layer3.0.conv2.0.weight_clip_val"], [-1.0, 1.0])
  assert "layer2.0.act2.alpha" not in resnet19  # parallel neurons have only a threshold
  assert not any(k.startswith("layer1.") for k in resnet19)  # the authors leave layer1 empty

  # VGG-11 stage 3 is [256, 256, 'M']: conv, BN, ECA, neuron, conv, BN, ECA, neuron, pool.
  vgg = convert.to_torch_state_dict(_build("vgg11", seca=1), layout="hd_lif")
  assert vgg["layer3.4.weight"].shape == (32, 32, 3, 3)
  assert vgg["layer3.5.running_var"].shape == (32,)
  assert vgg["layer3.6.conv.weight"].shape == (1, 1, 5)
  assert vgg["layer3.7.v_th"].shape == (T,)
  assert vgg["classifier.weight"].shape == (CLASSES, 64)
  vgg13 = convert.to_torch_state_dict(_build("vgg13"), layout="hd_lif")
  # VGG-13 stage 2 is [64, 'M', 128, 128, 'M']: conv, BN, neuron, pool, conv, ...
  assert vgg13["layer2.4.weight"].shape == (16, 8, 3, 3)
  assert vgg13["layer5.0.weight"].shape == (64, 64, 3, 3)


@pytest.mark.parametrize("layout", convert.LAYOUTS)
@pytest.mark.parametrize(
  "config",
  [BASE, VARIANT, dict(name="vgg_snn", mem_bn=True), dict(name="vgg11", neuron="lif", seca=1)],
  ids=["resnet18", "resnet19-variants", "vgg_snn", "vgg11-lif"],
)
def test_round_trip_is_exact(layout, config):
  model = _build(**config, seed=4)
  exported = convert.to_torch_state_dict(model, layout=layout)
  fresh = convert.load_torch_state_dict(
    _build(**config, seed=5), exported, layout=layout, parallel_threshold="per_step"
  )
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh), nnx.state(model))


def test_hd_lif_parallel_threshold_uses_the_first_step_by_default():
  model = _build(**VARIANT)
  exported = convert.to_torch_state_dict(model, layout="hd_lif")
  exported["layer2.0.act2.v_th"] = np.array([0.3, -0.7], np.float32)
  first = convert.load_torch_state_dict(_build(**VARIANT), exported, layout="hd_lif")
  np.testing.assert_array_equal(first.blocks[0].act2.b[...], np.float32([0.3, 0.3]))
  per_step = convert.load_torch_state_dict(
    _build(**VARIANT), exported, layout="hd_lif", parallel_threshold="per_step"
  )
  np.testing.assert_array_equal(per_step.blocks[0].act2.b[...], np.float32([0.3, -0.7]))


def test_bad_state_dict_lists_every_problem_and_writes_nothing():
  model = _build(**BASE)
  before = jax.tree.map(np.asarray, nnx.state(model))
  state = convert.to_torch_state_dict(_build(**BASE, seed=6))
  del state["blocks.2.conv1.weight"]
  state["blocks.0.extra"] = np.zeros(3, np.float32)
  state["fc.weight"] = state["fc.weight"].T
  with pytest.raises(convert.CheckpointError) as error:
    convert.load_torch_state_dict(model, state)
  message = str(error.value)
  for needle in (
    "missing (1): blocks.2.conv1.weight",
    "unexpected (1): blocks.0.extra",
    "fc.weight: shape (64, 10), expected (10, 64)",
  ):
    assert needle in message
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_bad_layouts_and_buffers_are_rejected():
  ternary = _build(**VARIANT)
  state = convert.to_torch_state_dict(ternary, layout="hd_lif")
  state["layer2.0.conv1.0.weight_clip_val"] = np.array([-2.0, 2.0], np.float32)
  with pytest.raises(convert.CheckpointError, match="weight_clip_val"):
    convert.load_torch_state_dict(ternary, state, layout="hd_lif")
  with pytest.raises(convert.CheckpointError, match="ConvNetSmall"):
    convert.to_torch_state_dict(_build("convnet_small"), layout="hd_lif")
  with pytest.raises(convert.CheckpointError, match="'model' entry"):
    convert.load_torch_state_dict(ternary, {"model": state, "snn_epoch": 3}, layout="hd_lif")
  with pytest.raises(ValueError, match="layout='keras'"):
    convert.to_torch_state_dict(ternary, layout="keras")
