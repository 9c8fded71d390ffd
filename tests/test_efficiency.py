"""Firing rates, SOP/MAC/NOP counts and energy: hand counts and a brute-force tap enumeration."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import efficiency, layers, models, testing
from empf_jax.layers import QConv
from empf_jax.quantize import ternary_codes


def _spikes(shape, entries):
  x = np.zeros(shape, np.float32)
  for index, value in entries.items():
    x[index] = value
  return jnp.asarray(x)


def test_two_layer_hand_count_with_borders_and_stride():
  # Layer 1: binary 3x3, stride 1, padding 1, 1 -> 2 channels on a 4x4 map (output 4x4).
  conv1 = QConv(1, 2, 3, stride=1, weights="binary", rngs=nnx.Rngs(0))
  s1 = _spikes(
    (1, 1, 4, 4, 1),
    {
      (0, 0, 0, 0, 0): 0.3,  # corner: 2 x 2 windows
      (0, 0, 0, 2, 0): 1.0,  # top edge: 2 x 3 windows
      (0, 0, 1, 1, 0): 2.5,  # interior: 3 x 3 windows
      (0, 0, 3, 1, 0): 0.0,
    },
  )  # silent
  ops1 = efficiency.conv_synaptic_ops(s1, efficiency.nonzero_weights(conv1), 1, 1)
  assert float(ops1) == (4 + 6 + 9) * 2
  # Every input counted (a current-fed layer): sum over inputs of the windows covering them.
  windows = np.array([2, 3, 3, 2])  # per row (and column) of a 4-wide map, stride 1, padding 1
  dense = efficiency.conv_synaptic_ops(s1, efficiency.nonzero_weights(conv1), 1, 1, sparse=False)
  assert float(dense) == np.sum(np.outer(windows, windows)) * 2

  # Layer 2: ternary 3x3, stride 2, padding 1, 2 -> 3 channels (output 2x2). Output row o reads
  # input rows 2o-1..2o+1, so input row 0 is read by o=0 through tap 1, row 1 by o=0 (tap 2) and
  # o=1 (tap 0), row 2 by o=1 (tap 1), row 3 by o=1 (tap 2).
  conv2 = QConv(2, 3, 3, stride=2, weights="ternary", rngs=nnx.Rngs(0))
  kernel = np.ones((3, 3, 2, 3), np.float32)
  kernel[1, 1, 0, :] = 0.0  # channel 0: the centre tap is zero for every output channel
  kernel[:, :, 1, 2] = 0.0  # channel 1 never reaches output channel 2
  kernel[0, 0, 1, 0] = -1.0
  conv2.kernel[...] = jnp.asarray(kernel)
  step = {
    (0, 0, 0, 0, 0): 1.0,  # read only through the zero centre tap: 0
    (0, 0, 1, 1, 0): 0.5,  # 2 x 2 windows, no centre tap: 4 x 3 = 12
    (0, 0, 2, 2, 0): 0.25,  # only the centre tap of output (1, 1): 0
    (0, 0, 3, 3, 1): 0.75,  # 1 window x 2 non-zero outputs = 2
    (0, 0, 2, 1, 1): 2.0,
  }  # rows {1}, columns {0, 1}: 2 windows x 2 = 4
  s2 = _spikes((2, 1, 4, 4, 2), {**step, **{(1,) + k[1:]: 3 * v for k, v in step.items()}})
  ops2 = efficiency.conv_synaptic_ops(s2, efficiency.nonzero_weights(conv2), 2, 1)
  assert float(ops2) == 2 * (0 + 12 + 0 + 2 + 4)
  assert float(ops1 + ops2) == 38 + 36


def test_dense_hand_count():
  x = jnp.asarray([[[0.0, 1.5, 0.0, 0.2, 3.0]], [[0.0, 0.0, 0.0, 0.0, 1.0]]])
  assert float(efficiency.dense_synaptic_ops(x, 4)) == (3 + 1) * 4
  assert float(efficiency.dense_synaptic_ops(x, 4, sparse=False)) == 10 * 4


def _brute_force_conv_ops(inputs, nonzero, stride, padding, sparse):
  """Enumerates kernel taps: input row r is read through tap a by output row (r + p - a) / s."""
  inputs, nonzero = np.asarray(inputs), np.asarray(nonzero)
  _, _, height, width, _ = inputs.shape
  k = nonzero.shape[0]
  mask = (inputs != 0) if sparse else np.ones(inputs.shape, bool)

  def reached(n, tap):
    out = (n + 2 * padding - k) // stride + 1
    return [
      r
      for r in range(n)
      if (r + padding - tap) % stride == 0 and 0 <= (r + padding - tap) // stride < out
    ]

  total = 0
  for a in range(k):
    for b in range(k):
      rows, cols = reached(height, a), reached(width, b)
      per_channel = mask[:, :, rows][:, :, :, cols].sum(axis=(0, 1, 2, 3))
      total += int(per_channel @ nonzero[a, b].sum(axis=-1))
  return total


def _randomize_kernels(model, key):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, QConv) and node.weights != "float":
      k = jax.random.fold_in(key, zlib.crc32(repr(path).encode()) % 2**31)
      fan_in = node.kernel_size**2 * node.in_features
      node.kernel[...] = math.sqrt(2.0 / fan_in) * layers.draw(
        jax.random.normal, k, node.kernel.shape
      )


NETWORKS = {
  "resnet18": (
    dict(weights="ternary", mem_bn=True, parallel=True, seca=2, spike_bits=4),
    (8, 8, 3),
    {
      "stem.conv",
      "blocks.2.shortcut_conv",
      "blocks.4.shortcut_conv",
      "blocks.6.shortcut_conv",
      "fc",
    },
  ),
  "convnet_small": (dict(weights="binary"), (8, 8, 1), {"unit1.conv"}),
  "resnet19": (
    dict(weights="binary", neuron="lif", seca=1),
    (8, 8, 3),
    {
      "stem.conv",
      "blocks.0.shortcut_conv",
      "blocks.3.shortcut_conv",
      "blocks.6.shortcut_conv",
      "fc_hidden",
    },
  ),
  "vgg_snn": (dict(weights="binary", mem_bn=True), (48, 48, 2), set()),
  "mlp": (dict(weights="binary", step_stats=True), (2, 6, 1), {"unit1.conv"}),
}
NEURON_OPS = {"empf": (1, 2), "empf+mem_bn": (2, 3), "parallel": (0, 1), "lif": (1, 2)}


def _network(name):
  options, shape, _ = NETWORKS[name]
  full = dict(num_classes=4, time_steps=2, width=1 / 8, **options)
  if name == "convnet_small":
    full["in_channels"] = 1
  if name == "mlp":
    full["in_features"] = math.prod(shape)
  model = models.create(name, **full, rngs=nnx.Rngs(0))
  testing.randomize(model, jax.random.key(1))
  _randomize_kernels(model, jax.random.key(2))
  keys = jax.random.split(jax.random.key(3), 2)
  batches = [layers.draw(jax.random.normal, k, (2, 2) + shape) for k in keys]
  if name == "vgg_snn":
    batches = [jnp.round(jnp.abs(b)) * (b > 0.5) for b in batches]  # sparse event counts
  return model, batches


@pytest.mark.parametrize(
  "name",
  ["resnet18", "mlp"]
  + [
    pytest.param(name, marks=pytest.mark.slow) for name in ("convnet_small", "resnet19", "vgg_snn")
  ],
)
def test_measure_matches_brute_force(name):
  model, batches = _network(name)
  currents = NETWORKS[name][2]
  report = efficiency.measure(model, batches)
  assert report.samples == 4 and report.time_steps == 2
  assert not any(getattr(node, "record", False) for _, node in nnx.iter_graph(model))
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))

  graphdef, state = nnx.split(model)
  record = jax.jit(lambda state, x: efficiency.recorded_run(nnx.merge(graphdef, state), x)[1])
  recorded = [record(state, x) for x in batches]
  first_conv = "stem.conv" if "stem.conv" in recorded[0] else report.synaptic[0].name
  # The first layer reads the input itself (the mlp reads each step's input flattened).
  np.testing.assert_array_equal(
    recorded[0][first_conv], batches[0].reshape(recorded[0][first_conv].shape)
  )
  modules = {".".join(map(str, p)): n for p, n in nnx.iter_graph(model)}
  assert {layer.source for layer in report.synaptic if layer.name in currents} <= {"currents"}
  assert {layer.name for layer in report.synaptic if layer.source == "currents"} == currents
  for layer in report.synaptic:
    module = modules[layer.name]
    sparse = layer.name not in currents
    if layer.kind == "conv":
      nonzero = (
        np.ones(module.kernel.shape)
        if module.weights != "ternary"
        else np.asarray(ternary_codes(module.kernel[...])[0] != 0)
      )
      expected = sum(
        _brute_force_conv_ops(r[layer.name], nonzero, module.stride, module.padding, sparse)
        for r in recorded
      )
      assert layer.op == ("MAC" if module.weights == "float" else "AC"), layer.name
    else:
      expected = sum(
        int(np.sum(np.asarray(r[layer.name]) != 0) if sparse else r[layer.name].size)
        * module.out_features
        for r in recorded
      )
      assert layer.op == "MAC"
    np.testing.assert_allclose(layer.ops, expected / 4, rtol=1e-6, err_msg=layer.name)
    rate = np.mean([np.mean(np.asarray(r[layer.name]) != 0) for r in recorded])
    np.testing.assert_allclose(layer.input_rate, rate, rtol=1e-6, err_msg=layer.name)

  for layer in report.neurons:
    spikes = [np.asarray(r[layer.name]) for r in recorded]
    np.testing.assert_allclose(
      layer.firing_rate, np.mean([np.mean(s != 0) for s in spikes]), rtol=1e-6, err_msg=layer.name
    )
    assert layer.neurons == math.prod(spikes[0].shape[2:])
    muls, adds = NEURON_OPS[layer.kind]
    assert (layer.muls, layer.adds) == (muls * layer.neurons * 2, adds * layer.neurons * 2)
  assert 0.02 < report.firing_rate < 0.98

  factor = 1 / 8 if NETWORKS[name][0].get("spike_bits") == 4 else 1.0
  sops = sum(layer.ops for layer in report.synaptic if layer.name not in currents)
  np.testing.assert_allclose(report.energy_authors_pj, sops * 0.9 * factor, rtol=1e-9)
  full = (
    sum(layer.ops * (0.9 if layer.op == "AC" else 4.6) for layer in report.synaptic)
    + sum(layer.muls * 3.7 + layer.adds * 0.9 for layer in report.neurons)
    + sum(layer.macs * 4.6 + layer.muls * 3.7 + layer.adds * 0.9 for layer in report.attention)
  )
  np.testing.assert_allclose(report.energy_full_pj, full, rtol=1e-9)
  assert report.energy_full_pj > report.energy_authors_pj

  table = efficiency.to_markdown(report)
  for layer in (*report.synaptic, *report.neurons, *report.attention):
    assert f"| {layer.name} |" in table
  assert f"{report.energy_full_pj * 1e-6:.4g}" in table


def test_seca_and_per_sample_counts():
  model, batches = _network("resnet18")
  one = efficiency.measure(model, batches[:1])
  two = efficiency.measure(model, batches)
  assert one.spike_bits == 4
  # SECA of block 0 gates the 8x8 x 8-channel output of each conv: per step 64*8 multiplies.
  seca = {layer.name: layer for layer in one.attention}
  assert seca["blocks.0.seca1"].muls == 8 * 8 * 8 * 2
  assert seca["blocks.0.seca1"].macs == 5 * 8 * 2
  assert seca["blocks.2.seca2"].adds == 4 * 4 * 16 * 2
  # Per-sample figures over two batches are the mean of the per-batch figures.
  three = efficiency.measure(model, batches[1:])
  for a, b, c in zip(one.synaptic, three.synaptic, two.synaptic, strict=True):
    np.testing.assert_allclose(c.ops, (a.ops + b.ops) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="same number of time steps"):
    efficiency.measure(model, [batches[0], batches[1][:1]])
