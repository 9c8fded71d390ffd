"""Networks (docs/model.md §3): validation, structure, coverage of every option, and the execution
equalities of section 1 and 4 on whole networks (step-by-step == all steps; the online cut).

Networks are width 1/8 with T <= 3 on 16x16 inputs (8x8 for convnet_small). On these tiny programs
compilation dominates, so parameters are drawn with the "rbg" generator (whose kernels compile much
faster on CPU than threefry's) and the test programs are compiled at XLA's backend optimisation
level 0. Every equality test first randomises the neuron scalars, BN parameters, running statistics
and convolution kernels.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import layers, models, quantize, testing
from empf_jax.layers import (
  BinaryWeight,
  EMPFNeuron,
  FloatWeight,
  LIFNeuron,
  ParallelNeuron,
  TernaryWeight,
)

WIDTH = 1 / 8
CLASSES = 5
BATCH = 2
INPUTS = {
  "resnet18": (16, 16, 3),
  "resnet19": (16, 16, 3),
  "resnet34": (16, 16, 3),
  "vgg11": (16, 16, 3),
  "vgg13": (16, 16, 3),
  "vgg_snn": (48, 48, 2),
  "convnet_small": (8, 8, 1),
  "convnet28": (28, 28, 1),
  "mini_resnet": (8, 8, 3),
  "mlp": (2, 6, 1),
}


FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn=None, **kwargs):
  """``jax.jit`` with quick compilation (see the module docstring)."""
  if fn is None:
    return functools.partial(_jit, **kwargs)
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _create(name, *, time_steps=2, seed=0, **options):
  return models.create(
    name,
    num_classes=CLASSES,
    time_steps=time_steps,
    width=WIDTH,
    in_channels=INPUTS[name][-1],
    in_features=math.prod(INPUTS[name]),
    rngs=_rngs(seed),
    **options,
  )


def _mini_resnet(time_steps, **options):
  """The ResNet class with one identity block, one downsampling block and the ResNet-19 head
  (FC -> neuron -> FC): every ResNet code path at a quarter of resnet18's size."""
  opts = models.NetOptions(
    "resnet19",
    num_classes=CLASSES,
    time_steps=time_steps,
    width=WIDTH,
    symmetric_init=True,
    **options,
  )
  return models.ResNet((1, 1), (64, 128), (1, 2), opts, hidden=opts.channels(256), rngs=_rngs())


def _abstract(name, **options):
  options.setdefault("num_classes", CLASSES)
  options.setdefault("time_steps", 2)
  return nnx.eval_shape(lambda: models.create(name, **options))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _input(name, time_steps, seed=1):
  return _normal(seed, (time_steps, BATCH) + INPUTS[name])


# ------------------------------------------------------------------------------------ validation

INVALID = [
  ("resnet50", dict(), "name", "'resnet50'", "'resnet18'"),
  ("resnet18", dict(neuron="izhikevich"), "neuron", "'izhikevich'", "'empf', 'lif'"),
  ("resnet18", dict(weights="int8"), "weights", "'int8'", "'binary', 'ternary', 'float'"),
  ("resnet18", dict(stem="mnist"), "stem", "'mnist'", "'imagenet'"),
  ("vgg11", dict(stem="imagenet"), "stem", "'imagenet'", "'cifar'"),
  ("resnet18", dict(spike_bits=3), "spike_bits", "3", "None, 4"),
  ("resnet18", dict(seca=3), "seca", "3", "0, 1, 2"),
  ("vgg11", dict(parallel=True), "parallel", "True", "resnet18"),
  ("convnet_small", dict(seca=2), "seca", "2", "0, 1"),
  ("resnet18", dict(neuron="lif", mem_bn=True), "mem_bn", "True", "False"),
  ("resnet18", dict(neuron="lif", parallel=True), "parallel", "True", "False"),
  ("resnet18", dict(neuron="lif", spike_bits=4), "spike_bits", "4", "None"),
  ("resnet18", dict(learnable_lif=True), "learnable_lif", "True", "False"),
  ("resnet18", dict(time_steps=0), "time_steps", "0", ">= 1"),
  ("resnet18", dict(num_classes=0), "num_classes", "0", ">= 1"),
  ("resnet18", dict(width=0), "width", "0", "> 0"),
  ("resnet18", dict(seca=True), "seca", "True", "0, 1, 2"),
  ("resnet18", dict(mem_bn=1), "mem_bn", "1", "False, True"),
  ("convnet_small", dict(step_stats="yes"), "step_stats", "'yes'", "False, True"),
  ("mlp", dict(), "in_features", "None", "an integer >= 1"),
  ("resnet18", dict(time_steps=2.0), "time_steps", "2.0", ">= 1"),
]


@pytest.mark.parametrize(
  "name,options,key,value,allowed", INVALID, ids=[f"{n}-{k}={v}" for n, _, k, v, _ in INVALID]
)
def test_create_rejects_with_a_message_naming_key_value_and_allowed(
  name, options, key, value, allowed
):
  arguments = dict(num_classes=10, time_steps=4) | options
  with pytest.raises(models.ConfigError) as error:
    models.create(name, **arguments)
  message = str(error.value)
  assert key in message and f"={value} is not allowed" in message and allowed in message, message
  assert isinstance(error.value, ValueError)


def test_create_accepts_numpy_numbers():
  model = _abstract(
    "convnet_small",
    num_classes=np.int64(10),
    time_steps=np.int32(3),
    in_channels=np.int64(1),
    width=np.float32(0.25),
  )
  assert model.fc.kernel.shape == (16, 10) and model.unit1.neuron.a.shape == (3,)


# ------------------------------------------------------------------------------------- structure


def _kernel(conv):
  return conv.kernel.shape, type(conv.kernel)


def test_resnet18_structure():
  model = _abstract("resnet18", num_classes=10)
  assert _kernel(model.stem.conv) == ((3, 3, 3, 64), FloatWeight)
  widths = [64, 64, 128, 128, 256, 256, 512, 512]
  strides = [1, 1, 2, 1, 2, 1, 2, 1]
  assert len(model.blocks) == 8
  for block, cout, stride, cin in zip(model.blocks, widths, strides, [64] + widths[:-1]):
    assert _kernel(block.conv1) == ((3, 3, cin, cout), BinaryWeight)
    assert block.conv1.stride == stride and block.conv2.stride == 1
    assert _kernel(block.conv2) == ((3, 3, cout, cout), BinaryWeight)
    if cin == cout:
      assert block.shortcut_conv is None
    else:
      assert _kernel(block.shortcut_conv) == ((1, 1, cin, cout), BinaryWeight)
      assert block.shortcut_conv.stride == 2 and block.shortcut_conv.padding == 0
  assert model.fc.kernel.shape == (512, 10) and model.fc_hidden is None


def test_resnet34_blocks():
  model = _abstract("resnet34", num_classes=1000, stem="imagenet", weights="ternary")
  assert len(model.blocks) == 16
  assert sum(block.shortcut_conv is not None for block in model.blocks) == 3
  assert _kernel(model.stem.conv) == ((7, 7, 3, 64), FloatWeight) and model.stem.conv.stride == 2
  assert isinstance(model.blocks[-1].conv2.kernel, TernaryWeight)


@pytest.mark.parametrize("stem,stride,channels", [("cifar", 1, 3), ("event", 2, 2)])
def test_resnet19_structure(stem, stride, channels):
  model = _abstract("resnet19", stem=stem, mem_bn=True, parallel=True)
  assert _kernel(model.stem.conv) == ((3, 3, channels, 64), FloatWeight)
  assert [block.conv2.out_features for block in model.blocks] == [128] * 3 + [256] * 3 + [512] * 2
  first = model.blocks[0]
  assert _kernel(first.shortcut_conv) == ((1, 1, 64, 128), BinaryWeight)
  assert first.conv1.stride == stride and first.shortcut_conv.stride == stride
  assert model.fc_hidden.kernel.shape == (512, 256) and model.fc.kernel.shape == (256, CLASSES)
  assert isinstance(model.fc_hidden.kernel, FloatWeight) and isinstance(
    model.fc.kernel, FloatWeight
  )
  # The head neuron is a plain EM-PF neuron even when the blocks use Mem-BN and parallel neurons.
  assert type(model.head_neuron) is EMPFNeuron and model.head_neuron.mem_bn is None
  assert model.blocks[0].act1.mem_bn is not None


def test_vgg_first_convolution():
  snn = _abstract("vgg_snn", num_classes=10)
  vgg11 = _abstract("vgg11", num_classes=10)
  assert _kernel(snn.units[0].conv) == ((3, 3, 2, 64), BinaryWeight)
  assert _kernel(vgg11.units[0].conv) == ((3, 3, 3, 64), FloatWeight)
  assert [u.conv.out_features for u in snn.units] == [64, 128, 256, 256, 512, 512, 512, 512]
  assert all(isinstance(u.conv.kernel, BinaryWeight) for u in vgg11.units[1:])
  assert snn.fc.kernel.shape == (512 * 3 * 3, 10) and vgg11.fc.kernel.shape == (512, 10)
  vgg13 = _abstract("vgg13", num_classes=10)
  assert [u.conv.out_features for u in vgg13.units] == [
    64,
    64,
    128,
    128,
    256,
    256,
    512,
    512,
    512,
    512,
  ]


def test_convnet_small_structure():
  model = _abstract("convnet_small", num_classes=10, in_channels=1)
  assert _kernel(model.unit1.conv) == ((3, 3, 1, 32), FloatWeight)
  assert _kernel(model.unit2.conv) == ((3, 3, 32, 64), BinaryWeight)
  assert _kernel(model.unit3.conv) == ((3, 3, 64, 64), BinaryWeight)
  assert model.fc.kernel.shape == (64, 10)


def test_convnet28_structure_and_input_size():
  model = _abstract("convnet28", num_classes=10, in_channels=1)
  assert [_kernel(u.conv) for u in model.units] == [
    ((3, 3, 1, 32), FloatWeight),
    ((3, 3, 32, 64), BinaryWeight),
    ((3, 3, 64, 128), BinaryWeight),
  ]
  assert model.plan == (32, "M", 64, "M", 128)
  assert model.fc.kernel.shape == (7 * 7 * 128, 10)
  small = models.create("convnet28", num_classes=3, time_steps=1, in_channels=1, width=WIDTH)
  with pytest.raises(
    ValueError,
    match=r"reaches the classifier as 8x8 maps; this network "
    r"flattens 7x7 maps \(inputs of 28x28 pixels\)",
  ):
    small(jnp.zeros((1, 1, 32, 32, 1)))


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_parallel_replaces_exactly_the_second_neuron_of_each_block(name):
  model = _abstract(name, parallel=True, spike_bits=4)
  for block in model.blocks:
    assert type(block.act1) is EMPFNeuron and type(block.act2) is ParallelNeuron
    assert block.act2.spike_bits == 4
  plain = _abstract(name)
  assert all(type(b.act1) is EMPFNeuron and type(b.act2) is EMPFNeuron for b in plain.blocks)


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "convnet_small"])
def test_neuron_kind_and_per_step_scalars(name):
  lif = _abstract(name, neuron="lif", time_steps=3)
  learnable = _abstract(name, neuron="lif", learnable_lif=True, time_steps=3)
  empf = _abstract(name, mem_bn=True, time_steps=3)
  for model, kind, tag in (
    (lif, LIFNeuron, layers.FixedNeuronScalar),
    (learnable, LIFNeuron, layers.NeuronParam),
    (empf, EMPFNeuron, layers.NeuronParam),
  ):
    neurons = [n for _, n in nnx.iter_graph(model) if isinstance(n, layers.Neuron)]
    assert neurons and all(type(n) is kind for n in neurons)
    assert all(isinstance(n.a, tag) and n.a.shape == (3,) and n.b.shape == (3,) for n in neurons)
  assert all(n.mem_bn.c.shape == (3,) for _, n in nnx.iter_graph(empf) if isinstance(n, EMPFNeuron))


def test_seca2_falls_back_to_seca1_where_channels_change():
  model = _abstract("resnet18", seca=2)
  assert [b.seca_variant for b in model.blocks] == [2, 2, 1, 2, 1, 2, 1, 2]


@pytest.mark.parametrize("stem,side", [("cifar", 32), ("tiny", 16), ("imagenet", 8)])
def test_stem_output_size(stem, side):
  model = _abstract("resnet18", stem=stem)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, BATCH, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).stem(x, 0, train=False), state, x)
  assert out.shape == (2, BATCH, side, side, 64)


def test_seca_gate_by_hand():
  seca = layers.SECA(rngs=_rngs())
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(seca, FloatWeight))) == 6
  x = _normal(2, (2, 3, 4, 4, 7))
  kernel, bias = np.asarray(seca.kernel[...]), float(seca.bias[...])
  pooled = np.asarray(x).mean(axis=(2, 3))  # [S, B, C]
  padded = np.pad(pooled, [(0, 0), (0, 0), (2, 2)])
  mixed = np.stack([np.dot(padded[..., c : c + 5], kernel) for c in range(7)], axis=-1) + bias
  gate = 1.0 / (1.0 + np.exp(-mixed))
  chex.assert_trees_all_close(
    seca(x), x * jnp.asarray(gate[:, :, None, None, :], jnp.float32), atol=1e-6
  )


@pytest.mark.parametrize("weights", ["binary", "ternary", "float"])
def test_qconv_uses_the_quantised_kernel(weights):
  conv = testing.randomize(
    layers.QConv(3, 4, 3, weights=weights, rngs=_rngs()), jax.random.key(7), kernels=True
  )
  kernel = conv.kernel[...]
  expected = {
    "binary": lambda k: jnp.mean(jnp.abs(k), axis=(0, 1, 2)) * jnp.where(k >= 0, 1.0, -1.0),
    "ternary": quantize.ternarize_ste,
    "float": lambda k: k,
  }[weights](kernel)
  chex.assert_trees_all_close(conv.effective_kernel(), expected, rtol=1e-6)
  x = _normal(3, (1, 2, 5, 5, 3))
  out = conv(x)
  reference = jax.lax.conv_general_dilated(
    x[0],
    conv.effective_kernel(),
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  chex.assert_trees_all_close(out[0], reference, atol=1e-5)


@_jit(static_argnums=(0, 3))
def _block_and_equations(graphdef, state, x, variant):
  """The block's output and the same block composed by hand from its submodules (eval mode)."""
  block = nnx.merge(graphdef, state)

  def attend(seca, residual, y):
    if variant == 0:
      return y
    return seca(residual + y) if variant == 2 else seca(y)

  spikes, _ = block.act1(x, None, 0, train=False)
  out = attend(block.seca1, x, block.bn1(block.conv1(spikes), train=False))
  spikes, _ = block.act2(out, None, 0, train=False)
  y = attend(block.seca2, out, block.bn2(block.conv2(spikes), train=False))
  shortcut = (
    x if block.shortcut_conv is None else block.shortcut_bn(block.shortcut_conv(x), train=False)
  )
  return block(x, None, 0, train=False, online=True)[0], y + shortcut


@pytest.mark.parametrize(
  "seca,cout,stride,variant", [(0, 8, 1, 0), (1, 8, 1, 1), (2, 8, 1, 2), (2, 16, 2, 1)]
)
def test_basic_block_equations(seca, cout, stride, variant):
  # docs/model.md §3; SECA-II falls back to SECA-I where the channels change.
  opts = models.NetOptions(
    "resnet18", num_classes=CLASSES, time_steps=2, seca=seca, symmetric_init=True
  )
  block = testing.randomize(
    models.BasicBlock(8, cout, stride, opts, rngs=_rngs(seca)), jax.random.key(seca), kernels=True
  )
  assert block.seca_variant == variant
  got, expected = _block_and_equations(*nnx.split(block), _normal(4, (2, BATCH, 6, 6, 8)), variant)
  chex.assert_trees_all_close(got, expected, atol=1e-5)


def _pool(x, window):
  """Non-overlapping average pooling of [S, B, H, W, C] written with a reshape."""
  s, b, h, w, c = x.shape
  return x.reshape(s, b, h // window, window, w // window, window, c).mean(axis=(3, 5))


def _unit(unit, x):
  """conv3x3 -> BN -> (SECA) -> neuron, from the zero state, eval mode."""
  y = unit.bn(unit.conv(x), train=False)
  if unit.seca is not None:
    y = unit.seca(y)
  return unit.neuron(y, None, 0, train=False)[0]


def _by_hand(kind, model, x):
  """The network of docs/model.md §3 composed from the model's own submodules."""
  if kind == "mini_resnet":
    h = model.stem.bn(model.stem.conv(x), train=False)
    for block in model.blocks:
      h, _ = block(h, None, 0, train=False, online=True)
    h = model.fc_hidden(h.mean(axis=(2, 3)))  # the stream carries currents into the pool
    return model.fc(model.head_neuron(h, None, 0, train=False)[0])
  if kind == "convnet_small":
    h = _unit(model.unit2, _unit(model.unit1, x))
    return model.fc(_unit(model.unit3, _pool(h, 2)).mean(axis=(2, 3)))
  units = iter(model.units)
  h = x
  for item in model.plan:
    if item == "M":
      h = _pool(h, 2)
    elif item == "G":
      h = h.mean(axis=(2, 3))
    else:
      h = _unit(next(units), h)
  return model.fc(h.reshape(h.shape[:2] + (-1,)))


@_jit(static_argnums=(0, 1))
def _network_and_equations(kind, graphdef, state, x):
  model = nnx.merge(graphdef, state)
  return model(x), _by_hand(kind, model, x)


def _plain(plan, flatten_to, **options):
  opts = models.NetOptions(
    "vgg_snn",
    num_classes=CLASSES,
    time_steps=2,
    in_channels=2,
    width=1.0,
    symmetric_init=True,
    **options,
  )
  return models.Plain(plan, opts, first_weights="binary", flatten_to=flatten_to, rngs=_rngs())


@pytest.mark.parametrize(
  "kind,build,side,channels",
  [
    ("mini_resnet", lambda: _mini_resnet(2, seca=1, mem_bn=True), 8, 3),
    ("convnet_small", lambda: _create("convnet_small", seca=1), 8, 1),
    ("plain", lambda: _plain((4, "M", 8, "M"), 2), 8, 2),
    ("plain", lambda: _plain((4, "M", 8, "G"), None, neuron="lif"), 8, 2),
  ],
  ids=["mini_resnet", "convnet_small", "plain_flatten", "plain_gap"],
)
def test_network_equations(kind, build, side, channels):
  model = testing.randomize(build(), jax.random.key(6), kernels=True)
  x = _normal(9, (2, BATCH, side, side, channels))
  got, expected = _network_and_equations(kind, *nnx.split(model), x)
  chex.assert_shape(got, (2, BATCH, CLASSES))
  chex.assert_trees_all_close(got, expected, atol=1e-5)


def test_vgg_plans_follow_the_spec():
  # VGG-11: [64] [128 M] [256 256 M] [512 512 M] [512 512 M];
  # VGG-13: [64] [64 M 128 128 M] [256 256 M] [512 512 512 M] [512 G].
  assert models.VGG11_PLAN == (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
  assert models.VGG13_PLAN == (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    "G",
  )


def test_step_batch_norm_statistics_and_running_update():
  bn = testing.randomize(layers.StepBatchNorm(3), jax.random.key(2))
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x = _normal(5, (2, 4, 3, 3, 3)) * jnp.array([1.0, 2.0, 0.5]) + jnp.array([0.0, 1.0, -1.0])
  y = bn(x, train=True)
  xs = np.asarray(x)
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  mean, var = old_mean, old_var
  for t in range(2):  # each step's slice on its own; running averages once per step, in order
    mu, sigma2 = xs[t].mean(axis=(0, 1, 2)), xs[t].var(axis=(0, 1, 2))
    expected = (xs[t] - mu) / np.sqrt(sigma2 + layers.BN_EPSILON) * scale + bias
    chex.assert_trees_all_close(y[t], jnp.asarray(expected, jnp.float32), atol=1e-5)
    mean = 0.9 * mean + 0.1 * mu
    var = 0.9 * var + 0.1 * xs[t].var(axis=(0, 1, 2), ddof=1)
  chex.assert_trees_all_close(
    (bn.mean[...], bn.var[...]),
    (jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)),
    atol=1e-5,
  )
  expected = (xs - mean) / np.sqrt(var + layers.BN_EPSILON) * scale + bias
  chex.assert_trees_all_close(bn(x, train=False), jnp.asarray(expected, jnp.float32), atol=1e-5)


def test_step_batch_norm_per_step_statistics():
  # time_steps=T: rows t0..t0+S-1 of the running averages get their own step's statistics once;
  # other rows are untouched; evaluation at step t uses row t (t0 traced, as in random-step).
  bn = testing.randomize(layers.StepBatchNorm(3, time_steps=4), jax.random.key(3))
  chex.assert_shape((bn.mean[...], bn.var[...]), (4, 3))
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  x = _normal(6, (2, 4, 3, 3, 3)) * jnp.array([1.0, 2.0, 0.5]) + jnp.array([0.0, 1.0, -1.0])
  graphdef, state = nnx.split(bn)

  @functools.partial(jax.jit, static_argnums=3)
  def run(state, x, t0, train):
    module = nnx.merge(graphdef, state)
    return module(x, t0, train=train), nnx.state(module)

  y, state = run(state, x, jnp.int32(1), True)
  xs = np.asarray(x)
  mean, var = old_mean.copy(), old_var.copy()
  scale, bias = np.asarray(bn.scale[...]), np.asarray(bn.bias[...])
  for s in range(2):
    mu, sigma2 = xs[s].mean(axis=(0, 1, 2)), xs[s].var(axis=(0, 1, 2))
    expected = (xs[s] - mu) / np.sqrt(sigma2 + layers.BN_EPSILON) * scale + bias
    chex.assert_trees_all_close(y[s], jnp.asarray(expected, jnp.float32), atol=1e-5)
    mean[1 + s] = 0.9 * old_mean[1 + s] + 0.1 * mu
    var[1 + s] = 0.9 * old_var[1 + s] + 0.1 * xs[s].var(axis=(0, 1, 2), ddof=1)
  trained = nnx.merge(graphdef, state)
  np.testing.assert_allclose(np.asarray(trained.mean[...]), mean, atol=1e-5)
  np.testing.assert_allclose(np.asarray(trained.var[...]), var, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(trained.mean[...])[[0, 3]], old_mean[[0, 3]])
  y_eval, _ = run(state, x, jnp.int32(2), False)
  for s in range(2):
    expected = (xs[s] - mean[2 + s]) / np.sqrt(var[2 + s] + layers.BN_EPSILON) * scale + bias
    chex.assert_trees_all_close(y_eval[s], jnp.asarray(expected, jnp.float32), atol=1e-5)


# -------------------------------------------------------------------------------------- coverage

# Every option on convnet_small and resnet18, covered by a few combined configurations (the
# paper's combinations among them); each option alone is in the slow set.
SINGLE_OPTIONS = [
  dict(neuron="lif"),
  dict(neuron="lif", learnable_lif=True),
  dict(weights="ternary"),
  dict(weights="float"),
  dict(mem_bn=True),
  dict(spike_bits=4),
  dict(seca=1),
]
RESNET_ONLY = [dict(seca=2), dict(parallel=True)]
COMBINED = [
  dict(weights="ternary", mem_bn=True, spike_bits=4, seca=1),
  dict(neuron="lif", learnable_lif=True, weights="float"),
]
PAPER_COMBINATIONS = [
  dict(parallel=True, spike_bits=4),
  dict(weights="ternary", mem_bn=True, seca=2),
]
RESNET_COMBINED = PAPER_COMBINATIONS + [
  dict(neuron="lif", weights="float", seca=1),
  dict(neuron="lif", learnable_lif=True, weights="ternary"),
]
_slow = functools.partial(pytest.param, marks=pytest.mark.slow)
COVERAGE = (
  [(name, {}) for name in models.NETWORKS if name != "resnet34"]
  + [_slow("resnet34", {})]
  + [("convnet_small", o) for o in COMBINED]
  + [("resnet18", o) for o in RESNET_COMBINED]
  + [_slow("convnet_small", o) for o in SINGLE_OPTIONS]
  + [_slow("resnet18", o) for o in SINGLE_OPTIONS + RESNET_ONLY]
)


def test_coverage_names_every_option_on_both_networks():
  fast = [c for c in COVERAGE if not hasattr(c, "marks")]
  every = {
    ("neuron", "lif"),
    ("neuron", "empf"),
    ("weights", "binary"),
    ("weights", "ternary"),
    ("weights", "float"),
    ("mem_bn", True),
    ("spike_bits", 4),
    ("seca", 1),
    ("learnable_lif", True),
  }
  defaults = dict(neuron="empf", weights="binary")
  for name, extra in (("convnet_small", set()), ("resnet18", {("seca", 2), ("parallel", True)})):
    seen = {item for n, o in fast if n == name for item in (defaults | o).items()}
    assert every | extra <= seen, (every | extra) - seen


def _id(case):
  name, options = case.values if hasattr(case, "values") else case
  return name + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("name,options", COVERAGE, ids=[_id(c) for c in COVERAGE])
def test_forward_shapes_single_trace_and_finite(name, options):
  time_steps = 2
  model = testing.randomize(
    _create(name, time_steps=time_steps, **options), jax.random.key(3), kernels=True
  )
  graphdef, state = nnx.split(model)
  chex.clear_trace_counter()

  @_jit
  @chex.assert_max_traces(n=1)
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = _input(name, time_steps)
  first = forward(state, x)
  second = forward(state, 2.0 * x)
  chex.assert_shape((first, second), (time_steps, BATCH, CLASSES))
  chex.assert_tree_all_finite((first, second))


# ------------------------------------------------------------- step-by-step == all steps, online

EXECUTION = [
  ("convnet_small", dict(mem_bn=True, seca=1, spike_bits=4), 3),
  ("convnet_small", dict(neuron="lif", learnable_lif=True, step_stats=True), 3),
  ("mini_resnet", dict(mem_bn=True, parallel=True, spike_bits=4, seca=2, step_stats=True), 2),
  ("mini_resnet", dict(neuron="lif"), 2),
  ("mlp", dict(mem_bn=True, step_stats=True), 3),
  pytest.param("resnet18", dict(weights="ternary", mem_bn=True, seca=2), 2, marks=pytest.mark.slow),
  pytest.param("resnet19", dict(parallel=True, spike_bits=4), 2, marks=pytest.mark.slow),
]


def _randomized(name, options, time_steps):
  if name == "mini_resnet":
    model = _mini_resnet(time_steps, **options)
  else:
    model = _create(name, time_steps=time_steps, symmetric_init=True, **options)
  return testing.randomize(model, jax.random.key(4), kernels=True)


@_jit(static_argnums=(0, 3))
def _all_steps(graphdef, state, x, train):
  model = nnx.merge(graphdef, state)
  logits = model(x, train=train)
  return logits, nnx.state(model)


@_jit(static_argnums=(0, 5))
def _one_step(graphdef, state, x_t, neuron_state, t, train):
  model = nnx.merge(graphdef, state)
  logits, neuron_state = model.step(x_t, neuron_state, t, train=train)
  return logits, neuron_state, nnx.state(model)


def _exec_id(case):
  name, options, _ = case.values if hasattr(case, "values") else case
  return name + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,options,time_steps", EXECUTION, ids=[_exec_id(c) for c in EXECUTION])
def test_step_by_step_equals_all_steps(name, options, time_steps, train):
  model = _randomized(name, options, time_steps)
  graphdef, state = nnx.split(model)
  x = _input(name, time_steps)
  logits, after_all = _all_steps(graphdef, state, x, train)
  neuron_state = model.init_state(x[0])
  stepwise, after_steps = [], state
  for t in range(time_steps):
    step_logits, neuron_state, after_steps = _one_step(
      graphdef, after_steps, x[t], neuron_state, jnp.int32(t), train
    )
    stepwise.append(step_logits)
  chex.assert_trees_all_close(jnp.stack(stepwise), logits, atol=1e-5, rtol=1e-5)
  stats_all = nnx.state(nnx.merge(graphdef, after_all), nnx.BatchStat)
  stats_steps = nnx.state(nnx.merge(graphdef, after_steps), nnx.BatchStat)
  chex.assert_trees_all_close(stats_steps, stats_all, atol=1e-5, rtol=1e-5)
  before = nnx.state(model, nnx.BatchStat)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats_all, before))
  assert all(changed) if train else not any(changed)
  if options.get("mem_bn"):
    assert any("mem_bn" in map(str, path) for path, _ in nnx.to_flat_state(stats_all))


ONLINE = [
  ("convnet_small", dict(), 2),
  ("convnet_small", dict(mem_bn=True, seca=1, spike_bits=4), 2),
  ("convnet_small", dict(neuron="lif", learnable_lif=True), 2),
  ("mini_resnet", dict(parallel=True, mem_bn=True, seca=2, spike_bits=4), 2),
  pytest.param("resnet18", dict(parallel=True, mem_bn=True, seca=2), 2, marks=pytest.mark.slow),
  pytest.param("resnet19", dict(neuron="lif"), 2, marks=pytest.mark.slow),
  pytest.param("resnet19", dict(mem_bn=True), 2, marks=pytest.mark.slow),
]


@_jit(static_argnums=(0, 4))
def _last_step_input_grad(graphdef, state, x, projection, online):
  """d <logits[-1], projection> / d x in training mode (all steps from the zero state)."""

  def loss(x):
    # Fresh Variable objects (tree.map rebuilds them), so BN may update its statistics under grad.
    model = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))
    return jnp.sum(model(x, train=True, online=online)[-1] * projection)

  return jax.grad(loss)(x)


@pytest.mark.parametrize("name,options,time_steps", ONLINE, ids=[_exec_id(c) for c in ONLINE])
def test_online_cut_stops_every_gradient_across_time(name, options, time_steps):
  model = _randomized(name, options, time_steps)
  x = _input(name, time_steps)
  projection = _normal(6, (BATCH, CLASSES))
  graphdef, state = nnx.split(model)
  online = _last_step_input_grad(graphdef, state, x, projection, True)
  bptt = _last_step_input_grad(graphdef, state, x, projection, False)
  # Online: the loss at step T-1 reaches only step T-1's input (BN statistics are per step).
  chex.assert_trees_all_equal(online[:-1], jnp.zeros_like(online[:-1]))
  assert float(jnp.abs(online[-1]).max()) > 0
  # BPTT reaches earlier inputs through the membrane; its same-step part is the online gradient.
  assert float(jnp.abs(bptt[:-1]).max()) > 0
  chex.assert_trees_all_close(bptt[-1], online[-1], atol=1e-6)


@_jit(static_argnums=0)
def _train_run(graphdef, state, x):
  return nnx.merge(graphdef, state).run(x, None, 0, train=True)


def test_bfloat16_compute_keeps_its_dtype():
  # Parameters stay float32; currents, spikes, neuron states and logits follow the input dtype.
  model = _randomized("mini_resnet", dict(parallel=True, mem_bn=True, seca=2, spike_bits=4), 2)
  x = _input("mini_resnet", 2).astype(jnp.bfloat16)
  logits, state = _train_run(*nnx.split(model), x)
  chex.assert_type([logits, *jax.tree.leaves(state)], jnp.bfloat16)
  chex.assert_shape(logits, (2, BATCH, CLASSES))
  chex.assert_tree_all_finite(logits)


def test_options_are_one_frozen_description_the_network_keeps():
  options = models.NetOptions("convnet_small", num_classes=CLASSES, time_steps=2, width=0.25)
  assert (options.stem, options.in_channels, options.spike_bits) == ("cifar", 3, None)
  model = nnx.eval_shape(lambda: models.create(options))
  assert model.options == options and model.time_steps == 2
  by_name = _abstract("convnet_small", width=0.25)
  assert by_name.options == options
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.width = 1.0
  with pytest.raises(models.ConfigError, match=r"unknown create\(\) option\(s\) \['depth'\]"):
    models.create("convnet_small", num_classes=CLASSES, time_steps=2, depth=3)
  with pytest.raises(models.ConfigError, match=r"\['num_classes'\] are required"):
    models.create("convnet_small", time_steps=2)


@pytest.mark.parametrize("partitionable", [True, False])
@pytest.mark.parametrize("sampler", ["uniform", "normal"])
def test_flat_draws_are_the_numbers_of_the_shaped_draws(partitionable, sampler):
  """Initial weights drawn flat (fast to compile) equal JAX's draws of the shape itself."""
  previous = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", partitionable)
  try:
    sample = getattr(jax.random, sampler)
    key = jax.random.key(3)
    shape = (3, 3, 4, 5)
    np.testing.assert_array_equal(layers.draw(sample, key, shape), sample(key, shape))
  finally:
    jax.config.update("jax_threefry_partitionable", previous)
