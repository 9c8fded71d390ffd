"""ONNX export: onnxruntime's cumulative outputs equal deploy.run's at every step, for every
network kind and option the library ships (random weights, small inputs)."""

import numpy as np
import pytest

from empf_jax import deploy
from empf_jax.deploy import export
from tests.test_deploy import CASES, INPUTS, _build, _case_id

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# float32, as deploy.run; the graph applies the same operations in the same order, so the
# differences are those of two convolution implementations.
RTOL, ATOL = 1e-4, 1e-5

# The kinds the library ships, each once by default: ternary with Mem-BN, 4-bit spikes and
# SECA-I; ResNet-18 with Mem-BN, parallel neurons and SECA-II; LIF with SECA-I; VGG-SNN's event
# stem; the mlp with per-step statistics (convnet28 below). The rest of CASES in the slow suite.
DEFAULT = {1, 3, 6, 11, 14}


def _session(model_proto):
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  return ort.InferenceSession(
    model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
  )


def _check(deployed, x, input_shape):
  proto = export.to_onnx(deployed, input_shape)
  cumulative, prediction = _session(proto).run(None, {"x": np.asarray(x, np.float32)})
  expected = np.cumsum(np.asarray(deploy.run(deployed, x)), axis=0)
  np.testing.assert_allclose(cumulative, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(prediction, np.argmax(expected[-1], axis=-1))
  return proto


@pytest.mark.parametrize(
  "case",
  [
    pytest.param(case, id=_case_id(case), marks=() if i in DEFAULT else pytest.mark.slow)
    for i, case in enumerate(CASES)
  ],
)
def test_onnxruntime_equals_the_runtime_at_every_step(case):
  name, options = case
  model, full, x = _build(name, options)
  deployed = deploy.deploy(model, name, **full)
  proto = _check(deployed, x, INPUTS[name])
  assert proto.opset_import[0].version == export.OPSET
  # The batch is symbolic: another batch size runs the same file.
  session = _session(proto)
  wider = np.concatenate([np.asarray(x)] * 3, axis=1)
  np.testing.assert_allclose(
    session.run(["cumulative"], {"x": wider})[0][:, :2],
    np.cumsum(np.asarray(deploy.run(deployed, x)), axis=0),
    rtol=RTOL,
    atol=ATOL,
  )


def _median_statistic(deployed, x, kind):
  """The median over examples and steps 1..T-1 of the rule's statistic: a threshold at which
  examples stop at different steps."""
  steps = x.shape[0]
  mean = np.cumsum(np.asarray(deploy.run(deployed, x)), 0) / np.arange(1, steps + 1)[:, None, None]
  if kind == "margin":
    top = np.sort(mean, -1)
    statistic = top[..., -1] - top[..., -2]
  else:
    e = np.exp(mean - mean.max(-1, keepdims=True))
    statistic = (e / e.sum(-1, keepdims=True)).max(-1)
  return float(np.median(statistic[:-1]))


def test_convnet28_the_fashion_mnist_network():
  """convnet28 (full-precision first unit, pooling, binary units at 14x14 and 7x7, flattened in
  NHWC order into the classifier) on 28x28 grey images."""
  import jax
  from flax import nnx

  from empf_jax import models, testing

  model = models.create(
    "convnet28", num_classes=10, time_steps=2, width=1 / 8, in_channels=1, rngs=nnx.Rngs(0)
  )
  testing.randomize(model, jax.random.key(1))
  deployed = deploy.deploy(model)
  x = np.random.default_rng(0).uniform(0, 1, (2, 3, 28, 28, 1)).astype(np.float32)
  _check(deployed, x, (28, 28, 1))


# Each rule kind once by default, every pairing (and a rule that never fires) in the slow suite.
EARLY_DEFAULT = {(3, "margin"), (14, "softmax")}


@pytest.mark.parametrize(
  "case,kind",
  [
    pytest.param(
      CASES[i],
      kind,
      id=f"{_case_id(CASES[i])}-{kind}",
      marks=() if (i, kind) in EARLY_DEFAULT else pytest.mark.slow,
    )
    for i in (1, 3, 14)
    for kind in ("margin", "softmax", "softmax:1")
  ],
)
def test_early_exit_graph_equals_run_early_exit(case, kind):
  """The exit variant: the same exit steps, predictions and c_t at exit as run_early_exit, on a
  batch whose examples stop at different steps (T = 4 here)."""
  name, options = case
  model, full, _ = _build(name, options, time_steps=4)
  deployed = deploy.deploy(model, name, **full)
  x = np.random.default_rng(0).normal(size=(4, 16) + INPUTS[name]).astype(np.float32) * 2.0
  rule = (
    deploy.ExitRule.parse(kind)
    if ":" in kind
    else deploy.ExitRule(kind, _median_statistic(deployed, x, kind))
  )
  expected = deploy.run_early_exit(deployed, x, rule)
  proto = export.to_onnx(deployed, INPUTS[name], rule)
  prediction, steps, cumulative = _session(proto).run(None, {"x": x})
  np.testing.assert_array_equal(steps, expected.steps)
  np.testing.assert_array_equal(prediction, expected.predictions)
  np.testing.assert_allclose(cumulative, expected.cumulative, rtol=RTOL, atol=ATOL)
  if rule.threshold < 1:
    assert len(set(steps.tolist())) > 1, f"exit steps {steps.tolist()}"
  else:
    assert set(steps.tolist()) == {4}
  # All stopped after step 1: the graph's later steps are skipped, and the answer is the same.
  first = x[:, :1]
  np.testing.assert_array_equal(
    _session(proto).run(["steps"], {"x": first})[0],
    deploy.run_early_exit(deployed, first, rule).steps,
  )
