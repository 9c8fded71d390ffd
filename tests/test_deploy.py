"""Deployed networks and bundles: folded inference == the trained network in eval mode."""

import hashlib
import math
import struct
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import accounting, bundle, deploy, layers, models, testing
from empf_jax.efficiency import recorded_run
from empf_jax.layers import EMPFNeuron, ParallelNeuron, QConv, StepBatchNorm
from empf_jax.quantize import quantize_spike

ATOL, RTOL = 1e-5, 1e-4
TIE_WINDOW = 1e-4  # |4 s - (k + 1/2)| below this is a rounding tie a float difference may flip

INPUTS = {
  "convnet_small": (8, 8, 1),
  "resnet18": (16, 16, 3),
  "resnet19": (16, 16, 3),
  "vgg_snn": (48, 48, 2),
  "mlp": (2, 6, 1),
}

# Pairwise cover of weights x neuron x mem_bn x parallel x spike_bits x seca (and the networks).
CASES = [
  ("convnet_small", dict(weights="binary")),
  ("convnet_small", dict(weights="ternary", mem_bn=True, spike_bits=4, seca=1)),
  ("convnet_small", dict(weights="float", neuron="lif", learnable_lif=True, seca=1)),
  ("resnet18", dict(weights="binary", mem_bn=True, parallel=True, seca=2)),
  ("resnet18", dict(weights="ternary", parallel=True, spike_bits=4)),
  ("resnet18", dict(weights="float", mem_bn=True, spike_bits=4)),
  ("resnet18", dict(weights="binary", neuron="lif", seca=1)),
  ("resnet19", dict(weights="binary", mem_bn=True, parallel=True, spike_bits=4, seca=1)),
  ("resnet19", dict(weights="ternary", neuron="lif", learnable_lif=True, seca=2)),
  ("resnet19", dict(weights="float", parallel=True, seca=2)),
  ("resnet19", dict(weights="binary", spike_bits=4, seca=2)),
  ("vgg_snn", dict(weights="binary", mem_bn=True, seca=1)),
  ("vgg_snn", dict(weights="ternary", neuron="lif")),
  ("vgg_snn", dict(weights="float", spike_bits=4)),
  ("mlp", dict(weights="binary", step_stats=True, mem_bn=True)),
  ("mlp", dict(weights="float", neuron="lif", step_stats=True)),
  ("convnet_small", dict(weights="ternary", step_stats=True, spike_bits=4)),
  ("resnet18", dict(weights="binary", step_stats=True, parallel=True)),
]
QUICK = {0, 1, 3, 14, 15, 16}


def _case_id(case):
  name, options = case
  return name + "-" + "-".join(f"{k}={v}" for k, v in sorted(options.items()))


def _params(cases):
  return [
    pytest.param(case, id=_case_id(case), marks=() if i in QUICK else pytest.mark.slow)
    for i, case in enumerate(cases)
  ]


def _randomize_kernels(model: nnx.Module, key: jax.Array) -> None:
  """Every conv kernel ~ N(0, 2 / fan_in): mixed signs, zeros for the ternary rule, and currents
  of order one (the default latent init has all signs +1 and tiny currents)."""
  for path, node in nnx.iter_graph(model):
    if isinstance(node, QConv):
      fan_in = node.kernel_size**2 * node.in_features
      k = jax.random.fold_in(key, zlib.crc32(repr(path).encode()) % 2**31)
      node.kernel[...] = math.sqrt(2.0 / fan_in) * layers.draw(
        jax.random.normal, k, node.kernel.shape
      )


def _build(name, options, seed=0, time_steps=2):
  full = dict(num_classes=5, time_steps=time_steps, width=1 / 8, **options)
  if name == "convnet_small":
    full["in_channels"] = 1
  if name == "mlp":
    full["in_features"] = math.prod(INPUTS[name])
  model = models.create(name, **full, rngs=nnx.Rngs(seed))
  testing.randomize(model, jax.random.key(seed + 1))
  _randomize_kernels(model, jax.random.key(seed + 2))
  x = 2.0 * layers.draw(jax.random.normal, jax.random.key(seed + 3), (2, 2) + INPUTS[name])
  if name == "vgg_snn":
    x = jnp.round(jnp.abs(x))  # event counts
  return model, full, x


def _eval_logits(model, x):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, x)


def _set_spike_bits(model, bits):
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (EMPFNeuron, ParallelNeuron)):
      node.spike_bits = bits


def _through_bundle(deployed):
  return bundle.from_bytes(bundle.to_bytes(deployed))


def _check_quantised(model, deployed, x, expected_logits):
  """With 4-bit spikes: the trained network's spikes equal Q(deployed pre-quantisation spikes) off
  rounding ties, layer by layer up to the first legitimate flip; logits agree when nothing flips."""
  logits, membranes = deploy.run(deployed, x, return_membranes=True)
  _, recorded = recorded_run(model, x)
  flips = 0
  for name, membrane in membranes.items():
    threshold = deployed.params[f"{name}.threshold"].reshape((-1,) + (1,) * (membrane.ndim - 1))
    spikes = np.asarray(jax.nn.relu(membrane - threshold))
    trained = np.asarray(recorded[name])
    np.testing.assert_array_equal(4 * trained, np.round(4 * trained), err_msg=name)
    differ = np.asarray(quantize_spike(spikes)) != trained
    tie = np.abs(4 * spikes - np.floor(4 * spikes) - 0.5) < TIE_WINDOW
    assert not np.any(differ & ~tie), f"{name}: quantised spikes differ away from rounding ties"
    flips += int(np.sum(differ))
    if flips:
      break
  if not flips:
    np.testing.assert_allclose(logits, expected_logits, atol=ATOL, rtol=RTOL)


def _firing_rates(deployed, membranes):
  rates = {}
  for name, membrane in membranes.items():
    threshold = deployed.params[f"{name}.threshold"].reshape((-1,) + (1,) * (membrane.ndim - 1))
    rates[name] = float(jnp.mean(membrane > threshold))
  return rates


@pytest.mark.parametrize("case", _params(CASES))
def test_deployed_bundle_matches_trained_network(case):
  name, options = case
  four_bit = options.get("spike_bits") == 4
  model, full, x = _build(name, options)
  deployed = _through_bundle(deploy.deploy(model, name, **full))
  expected = _eval_logits(model, x)
  if four_bit:
    _check_quantised(model, deployed, x, expected)
    _set_spike_bits(model, None)
    expected = _eval_logits(model, x)
  got, membranes = deploy.run(deployed, x, quantize_spikes=not four_bit, return_membranes=True)
  rates = _firing_rates(deployed, membranes)
  assert all(0 < rate < 1 for rate in rates.values()), f"silent or saturated layers: {rates}"
  chex.assert_shape(got, (2, 2, 5))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)


def test_deployed_network_runs_fewer_steps():
  model, full, x = _build("convnet_small", dict(weights="binary", mem_bn=True))
  deployed = deploy.deploy(model, "convnet_small", **full)
  logits = deploy.run(deployed, x)
  np.testing.assert_allclose(deploy.run(deployed, x[:1]), logits[:1], atol=1e-6)
  with pytest.raises(ValueError, match="3 time steps"):
    deploy.run(deployed, jnp.concatenate([x, x[:1]]))


def test_folded_parameters_follow_the_spec():
  """Folded scale = A alpha, bias = C, and Mem-BN's decay/gain/offset = (k lambda, k, h)."""
  model, full, _ = _build("convnet_small", dict(weights="binary", mem_bn=True))
  deployed = deploy.deploy(model, "convnet_small", **full)
  conv, bn = model.unit2.conv, model.unit2.bn
  kernel = np.asarray(conv.kernel[...])
  a = np.asarray(bn.scale[...]) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
  c = np.asarray(bn.bias[...]) - a * np.asarray(bn.mean[...])
  alpha = np.mean(np.abs(kernel), axis=(0, 1, 2))
  np.testing.assert_allclose(deployed.params["unit2.conv.scale"], a * alpha, rtol=1e-6)
  np.testing.assert_allclose(deployed.params["unit2.conv.bias"], c, rtol=1e-6, atol=1e-7)
  signs = np.where(kernel >= 0, 1.0, -1.0)
  np.testing.assert_array_equal(
    deploy.unpack_binary(jnp.asarray(deployed.params["unit2.conv.bits"]), kernel.shape), signs
  )
  membn = model.unit2.neuron.mem_bn
  sig = lambda v: 1 / (1 + np.exp(-np.asarray(v, np.float64)))
  am = np.asarray(membn.scale[...]) / np.sqrt(np.asarray(membn.var[...]) + 1e-5)
  cm = np.asarray(membn.bias[...]) - am * np.asarray(membn.mean[...])
  k = sig(membn.d[...])[:, None] + sig(membn.c[...])[:, None] * am
  h = sig(membn.c[...])[:, None] * cm
  lam = sig(model.unit2.neuron.a[...])[:, None]
  np.testing.assert_allclose(deployed.params["unit2.neuron.decay"], k * lam, rtol=1e-5)
  np.testing.assert_allclose(deployed.params["unit2.neuron.gain"], k, rtol=1e-5)
  np.testing.assert_allclose(deployed.params["unit2.neuron.offset"], h, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    deployed.params["unit2.neuron.threshold"], sig(model.unit2.neuron.b[...]), rtol=1e-6
  )
  stem = np.asarray(model.unit1.conv.kernel[...])
  a1, _ = model.unit1.bn.affine()
  np.testing.assert_allclose(deployed.params["unit1.conv.kernel"], stem * np.asarray(a1), rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 3, 4, 8), (1, 1, 3, 5), (3, 3, 1, 3)])
def test_pack_unpack_roundtrip(shape):
  w = np.array(layers.draw(jax.random.normal, jax.random.key(0), shape))
  w.reshape(-1)[0] = 0.0  # sign(0) = +1
  bits = deploy.pack_binary(w)
  assert bits.dtype == np.uint8 and bits.size == math.ceil(w.size / 8)
  np.testing.assert_array_equal(
    deploy.unpack_binary(jnp.asarray(bits), shape), np.where(w >= 0, 1.0, -1.0)
  )
  codes = np.sign(np.round(w))
  packed = deploy.pack_ternary(codes)
  assert packed.size == math.ceil(2 * w.size / 8)
  np.testing.assert_array_equal(deploy.unpack_ternary(jnp.asarray(packed), shape), codes)


def test_deploy_rejects_mismatched_options():
  model = models.create("convnet_small", num_classes=3, time_steps=2, width=1 / 8, mem_bn=True)
  with pytest.raises(deploy.DeployError, match="unit1.neuron.mem_bn"):
    deploy.deploy(model, "convnet_small", num_classes=3, time_steps=2, width=1 / 8)
  with pytest.raises(
    deploy.DeployError, match="fc.out_features: the model has 3, these options give 4"
  ):
    deploy.deploy(model, "convnet_small", num_classes=4, time_steps=2, width=1 / 8, mem_bn=True)
  with pytest.raises(
    deploy.DeployError,
    match=r"variables unit1.neuron.a: the model has "
    r"'NeuronParam \[2\]', these options give 'NeuronParam \[3\]'",
  ):
    deploy.deploy(model, "convnet_small", num_classes=3, time_steps=3, width=1 / 8, mem_bn=True)
  with pytest.raises(models.ConfigError, match="unknown create"):
    deploy.deploy(model, "convnet_small", num_classes=3, time_steps=2, depth=3)
  with pytest.raises(models.ConfigError, match="parallel"):
    deploy.deploy(model, "convnet_small", num_classes=3, time_steps=2, parallel=True)


# ---------------------------------------------------------------------------------------------
# Bundle format.


@pytest.fixture(scope="module")
def small_bundle():
  model, full, _ = _build("resnet18", dict(weights="ternary", mem_bn=True, seca=2, parallel=True))
  deployed = deploy.deploy(model, "resnet18", **full)
  return deployed, bundle.to_bytes(deployed)


def test_bundle_roundtrip_is_exact(small_bundle):
  deployed, data = small_bundle
  restored = bundle.from_bytes(data)
  assert restored.arch == deployed.arch
  assert sorted(restored.params) == sorted(deployed.params)
  for key, value in deployed.params.items():
    assert restored.params[key].dtype == value.dtype, key
    np.testing.assert_array_equal(restored.params[key], value, err_msg=key)
  assert bundle.to_bytes(restored) == data
  assert restored.arch.options.mem_bn is True
  assert restored.arch.options.width == 1 / 8


def _header_end(data: bytes) -> int:
  return 24 + struct.unpack_from("<I", data, 12)[0]


def _corruption_positions(data):
  header_end = _header_end(data)
  return {
    "magic": (0, "wrong magic"),
    "version": (8, "format version"),
    "header length": (12, "declares"),
    "payload length": (17, "declares"),
    "header start": (24, "checksum mismatch"),
    "header middle": ((24 + header_end) // 2, "checksum mismatch"),
    "payload start": (header_end, "checksum mismatch"),
    "payload middle": ((header_end + len(data)) // 2, "checksum mismatch"),
    "payload end": (len(data) - 33, "checksum mismatch"),
    "checksum first": (len(data) - 32, "checksum mismatch"),
    "checksum last": (len(data) - 1, "checksum mismatch"),
  }


def test_bundle_detects_any_flipped_byte(small_bundle):
  _, data = small_bundle
  for position, message in _corruption_positions(data).values():
    for flip in (0x01, 0x80):
      corrupted = bytearray(data)
      corrupted[position] ^= flip
      with pytest.raises(bundle.BundleError, match=message):
        bundle.from_bytes(bytes(corrupted))
  rng = np.random.default_rng(0)
  for position in rng.integers(0, len(data), size=40):
    corrupted = bytearray(data)
    corrupted[position] ^= 0x10
    with pytest.raises(bundle.BundleError):
      bundle.from_bytes(bytes(corrupted))


def test_bundle_detects_truncation(small_bundle):
  _, data = small_bundle
  for length in (0, 7, 23, 55, _header_end(data), len(data) // 2, len(data) - 32, len(data) - 1):
    with pytest.raises(bundle.BundleError, match="truncated"):
      bundle.from_bytes(data[:length])
  with pytest.raises(bundle.BundleError, match="trailing"):
    bundle.from_bytes(data + b"\0")


def _rewrite(data: bytes, *, version=None, header=None) -> bytes:
  """A bundle with a new version or header and a valid checksum."""
  magic, old_version, header_len, payload_len = struct.unpack_from("<8sIIQ", data)
  old_header = data[24 : 24 + header_len]
  payload = data[24 + header_len : -32]
  header = old_header if header is None else header
  body = (
    struct.pack(
      "<8sIIQ", magic, old_version if version is None else version, len(header), payload_len
    )
    + header
    + payload
  )
  return body + hashlib.sha256(body).digest()


def test_bundle_rejects_other_versions_and_bad_headers(small_bundle):
  _, data = small_bundle
  with pytest.raises(bundle.BundleError, match="format version 2 is not supported"):
    bundle.from_bytes(_rewrite(data, version=2))
  with pytest.raises(bundle.BundleError, match="wrong magic"):
    bundle.from_bytes(b"NOTABNDL" + data[8:])
  header = data[24 : _header_end(data)]
  with pytest.raises(bundle.BundleError, match="malformed header"):
    bundle.from_bytes(_rewrite(data, header=header[:-1]))
  with pytest.raises(bundle.BundleError, match="needs"):
    bundle.from_bytes(_rewrite(data, header=header.replace(b'"shape":[8]', b'"shape":[2,4]', 1)))
  with pytest.raises(bundle.BundleError, match="unexpected array"):
    bundle.from_bytes(
      _rewrite(data, header=header.replace(b'"blocks.0.conv1.bias"', b'"blocks.0.conv1.bogus"', 1))
    )


@pytest.mark.slow
def test_default_resnet18_bundle_size():
  """1 bit per binarised weight plus float parts: ~1.46 MB vs 2.82 MB (paper rule), 44.66 float."""
  model = models.create("resnet18", num_classes=10, time_steps=4)
  data = bundle.to_bytes(deploy.deploy(model, "resnet18", num_classes=10, time_steps=4))
  counts = accounting.weight_counts(model)
  bn_channels = sum(
    node.features for _, node in nnx.iter_graph(model) if isinstance(node, StepBatchNorm)
  )
  # packed signs + float weights (stem, FC) + scale and bias per BN channel (the stem has no scale)
  expected = (
    counts["BinaryWeight"] / 8
    + 4 * counts["FloatWeight"]
    + 8 * bn_channels
    - 4 * model.stem.bn.features
  )
  assert abs(len(data) - expected) / expected < 0.05, (len(data), expected)
  assert len(data) / 1e6 < 0.55 * accounting.param_megabytes(model)
  print(
    f"default ResNet-18 bundle: {len(data)} bytes = {len(data) / 1e6:.4f} MB "
    f"(paper rule {accounting.param_megabytes(model):.2f} MB)"
  )


# Bundles written by the format-1 writer of 2025-12 (convnet_small ternary + Mem-BN + 4-bit
# spikes + SECA-I; resnet19 binary + parallel + SECA-II + per-step statistics; mlp LIF with
# per-step statistics; vgg_snn with Mem-BN), with an input and the logits deploy.run gave then.
OLD_BUNDLES = np.load(__file__.rsplit("/", 1)[0] + "/data/bundles_v1.npz")


@pytest.mark.parametrize("name", ["convnet_small", "resnet19", "mlp", "vgg_snn"])
def test_bundles_written_before_load_and_compute_the_same(name):
  data = OLD_BUNDLES[f"{name}.bundle"].tobytes()
  deployed = bundle.from_bytes(data)
  assert deployed.arch.name == name
  np.testing.assert_allclose(
    deploy.run(deployed, jnp.asarray(OLD_BUNDLES[f"{name}.input"])),
    OLD_BUNDLES[f"{name}.logits"],
    atol=1e-6,
    rtol=1e-6,
  )
  assert bundle.to_bytes(deployed) == data
