"""Anytime inference: per-example early exit of a deployed network and its counted operations.

A hand-set two-class mlp computes logits_t = (relu(x0 - x1), relu(x1 - x0)) from its step input
(x0, x1) >= 0, so the step at which each example's mean output crosses a threshold, its
prediction and every operation it performs are known by hand.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import bundle, deploy, efficiency, layers, models, testing
from experiments import deploy as deploy_cli
from experiments import report

T = 4
AC, MAC, MUL = 0.9, 4.6, 3.7

# Step inputs (x0, x1) of four examples. Steps after an example's exit would change its
# prediction if they were not masked (A and C), D never reaches the margin and stops at T.
INPUTS = np.array(
  [
    [(3, 0), (0, 100), (0, 100), (0, 100)],  # A: mean margin 3 at t = 1
    [(1, 0), (5, 0), (0, 100), (0, 100)],  # B: margins 1, then 3 at t = 2
    [(0, 1), (0, 1), (0, 4), (100, 0)],  # C: margins 1, 1, then exactly 2 at t = 3
    [(1, 0), (1, 1), (0, 0), (0, 0.5)],  # D: margins 1, 0.5, 1/3, 1/8
  ],
  np.float32,
)
EXIT_STEPS = [1, 2, 3, 4]  # at margin 2
PREDICTIONS = [0, 0, 1, 0]


def step_counts(x0, x1):
  """(SOPs, ACs, MACs) of one step by hand: unit1 (float 1x1, fed by the input: every one of
  its 2 inputs reaches 2 outputs) 4 MACs; unit2 (binary, spike-fed) 2 ACs per non-zero input;
  the FC (float, spike-fed) 2 MACs per non-zero spike of unit2, which fires iff x0 != x1."""
  unit2 = 2 * (int(x0 != 0) + int(x1 != 0))
  fc = 2 * int(x0 != x1)
  return unit2 + fc, unit2, 4 + fc


def expected_operations(steps):
  """Per example, the hand counts over its first ``steps[b]`` steps."""
  out = {
    key: []
    for key in (
      "sops",
      "acs",
      "macs",
      "neuron_muls",
      "neuron_adds",
      "energy_authors_pj",
      "energy_full_pj",
    )
  }
  for example, ran in zip(INPUTS, steps, strict=True):
    sops, acs, macs = np.sum([step_counts(*x) for x in example[:ran]], axis=0)
    muls, adds = 1 * 4 * ran, 2 * 4 * ran  # 2 layers x 2 EM-PF neurons: 1 mul, 2 adds each
    values = (
      sops,
      acs,
      macs,
      muls,
      adds,
      sops * AC,
      acs * AC + macs * MAC + muls * MUL + adds * AC,
    )
    for key, value in zip(out, values, strict=True):
      out[key].append(float(value))
  return out


@pytest.fixture(scope="module")
def hand_net():
  """The mlp of the module docstring: identity float layer, threshold-0 decay-0 EM-PF neurons
  (spike = relu(current), no state), binary signs [[+1, -1], [-1, +1]], identity FC."""
  options = dict(num_classes=2, time_steps=T, in_features=2, width=2 / 256, weights="binary")
  model = models.create("mlp", **options, rngs=nnx.Rngs(0))
  deployed = deploy.deploy(model, "mlp", **options)
  params = dict(deployed.params)
  params["unit1.conv.kernel"] = np.eye(2, dtype=np.float32).reshape(1, 1, 2, 2)
  params["unit2.conv.bits"] = deploy.pack_binary(
    np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32).reshape(1, 1, 2, 2)
  )
  params["unit2.conv.scale"] = np.ones(2, np.float32)
  for layer in ("unit1", "unit2"):
    params[f"{layer}.conv.bias"] = np.zeros(2, np.float32)
    params[f"{layer}.neuron.threshold"] = np.zeros(T, np.float32)
    params[f"{layer}.neuron.decay"] = np.zeros(T, np.float32)
  params["fc.kernel"] = np.eye(2, dtype=np.float32)
  params["fc.bias"] = np.zeros(2, np.float32)
  assert set(params) == set(deployed.params)
  deployed = bundle.from_bytes(bundle.to_bytes(deploy.Deployed(deployed.arch, params)))
  x = jnp.asarray(INPUTS.transpose(1, 0, 2)).reshape(T, 4, 1, 2, 1)  # [T, B, H, W, C]
  return deployed, x


def test_hand_net_computes_the_relu_differences(hand_net):
  deployed, x = hand_net
  logits = deploy.run(deployed, x)
  x0, x1 = INPUTS[..., 0].T, INPUTS[..., 1].T
  np.testing.assert_array_equal(
    logits, np.stack([np.maximum(x0 - x1, 0), np.maximum(x1 - x0, 0)], axis=-1)
  )


@pytest.mark.parametrize(
  "rule",
  [
    deploy.ExitRule("margin", 2.0),
    # K = 2: top softmax of the mean = sigmoid(margin).
    deploy.ExitRule("softmax", float(jax.nn.sigmoid(1.9))),
  ],
)
def test_exit_steps_predictions_and_counted_operations_by_hand(hand_net, rule):
  deployed, x = hand_net
  result = deploy.run_early_exit(deployed, x, rule, probe=efficiency.step_operations)
  np.testing.assert_array_equal(result.steps, EXIT_STEPS)
  np.testing.assert_array_equal(result.predictions, PREDICTIONS)
  chex.assert_shape(result.cumulative, (4, 2))
  np.testing.assert_array_equal(result.cumulative[2], [0, 6])  # C frozen at t = 3
  expected = expected_operations(EXIT_STEPS)
  assert set(result.totals) == set(expected)
  for key, values in expected.items():
    np.testing.assert_allclose(result.totals[key], values, rtol=1e-6, err_msg=key)
  # The same from all steps' outputs and per-step counts, cut at each example's exit step.
  logits, per_step = deploy.run(deployed, x, probe=efficiency.step_operations)
  steps, predictions = deploy.exit_steps(logits, rule)
  np.testing.assert_array_equal(steps, EXIT_STEPS)
  np.testing.assert_array_equal(predictions, PREDICTIONS)
  for key, values in per_step.items():
    chex.assert_shape(values, (T, 4))
    cut = np.where(np.arange(T)[:, None] < np.asarray(steps)[None], values, 0).sum(axis=0)
    np.testing.assert_allclose(cut, expected[key], rtol=1e-6, err_msg=key)


def test_threshold_one_never_exits_though_softmax_rounds_to_one(hand_net):
  deployed, x = hand_net
  # Example A's mean logits after two steps differ by 48.5: the float32 softmax is exactly 1.
  assert float(jnp.max(jax.nn.softmax(jnp.array([1.5, 50.0])))) == 1.0
  logits, per_step = deploy.run(deployed, x, probe=efficiency.step_operations)
  never = deploy.run_early_exit(
    deployed, x, deploy.ExitRule("softmax", 1.0), probe=efficiency.step_operations
  )
  everything = deploy.run_early_exit(deployed, x, None, probe=efficiency.step_operations)
  all_steps = np.argmax(np.sum(np.asarray(logits), axis=0), axis=-1)
  np.testing.assert_array_equal(all_steps, [1, 1, 0, 0])
  for result in (never, everything):
    np.testing.assert_array_equal(result.steps, [T] * 4)
    np.testing.assert_array_equal(result.predictions, all_steps)
    for key, values in expected_operations([T] * 4).items():
      np.testing.assert_allclose(result.totals[key], values, rtol=1e-6, err_msg=key)
      np.testing.assert_allclose(np.sum(per_step[key], axis=0), values, rtol=1e-6, err_msg=key)


def _random_deployed(**options):
  options = dict(num_classes=5, time_steps=T, in_channels=1, width=1 / 8, **options)
  model = models.create("convnet_small", **options, rngs=nnx.Rngs(0))
  testing.randomize(model, jax.random.key(1), kernels=True)
  x = layers.draw(jax.random.normal, jax.random.key(2), (T, 6, 8, 8, 1))
  return model, deploy.deploy(model, "convnet_small", **options), x


def test_step_operations_over_all_steps_equal_measure():
  """The deployed runner's per-example counts sum to the trained network's efficiency report
  (ternary zeros skipped, Mem-BN neurons, SECA, the 4-bit discount of the authors' column)."""
  model, deployed, x = _random_deployed(weights="ternary", mem_bn=True, seca=1, spike_bits=4)
  measured = efficiency.measure(model, [x])
  _, per_step = deploy.run(deployed, x, probe=efficiency.step_operations)
  total = {key: float(np.sum(value)) / x.shape[1] for key, value in per_step.items()}
  muls, adds = measured.neuron_ops
  for key, value in (
    ("sops", measured.sops),
    ("acs", measured.acs),
    ("macs", measured.macs),
    ("neuron_muls", muls),
    ("neuron_adds", adds),
    ("energy_authors_pj", measured.energy_authors_pj),
    ("energy_full_pj", measured.energy_full_pj),
  ):
    np.testing.assert_allclose(total[key], value, rtol=1e-6, err_msg=key)
  assert 0 < measured.sops < measured.acs + measured.macs


@pytest.mark.parametrize("text", ["softmax:0.3", "softmax:0.6", "margin:0.05", "margin:0.2"])
def test_early_exit_loop_equals_exit_from_all_steps(text):
  """The while loop stops each example where the rule applied to the full run says, with the
  counts of those steps; one example at a time gives the same as the batch."""
  _, deployed, x = _random_deployed(weights="binary")
  rule = deploy.ExitRule.parse(text)
  result = deploy.run_early_exit(deployed, x, rule, probe=efficiency.step_operations)
  logits, per_step = deploy.run(deployed, x, probe=efficiency.step_operations)
  steps, predictions = deploy.exit_steps(logits, rule)
  np.testing.assert_array_equal(result.steps, steps)
  np.testing.assert_array_equal(result.predictions, predictions)
  mask = np.arange(T)[:, None] < np.asarray(steps)[None]
  for key, values in per_step.items():
    np.testing.assert_allclose(
      result.totals[key], np.sum(np.where(mask, values, 0), axis=0), rtol=1e-6, err_msg=key
    )
  for b in range(x.shape[1]):
    one = deploy.run_early_exit(deployed, x[:, b : b + 1], rule)
    assert (int(one.steps[0]), int(one.predictions[0])) == (int(steps[b]), int(predictions[b]))
    assert one.totals is None


def test_exit_rule_values():
  assert deploy.ExitRule.parse("softmax:0.9") == deploy.ExitRule("softmax", 0.9)
  assert str(deploy.ExitRule.parse("margin:2")) == "margin:2"
  for text, message in (
    ("softmax", "is not RULE:THRESHOLD"),
    ("softmax:x", "is not RULE"),
    ("entropy:0.5", "unknown exit rule 'entropy'; allowed: softmax, margin"),
    ("softmax:0", r"0.0 is not in \(0, 1\]"),
    ("softmax:1.5", r"is not in \(0, 1\]"),
    ("margin:-1", "not a finite number >= 0"),
    ("margin:nan", "not a finite number >= 0"),
  ):
    with pytest.raises(ValueError, match=message):
      deploy.ExitRule.parse(text)


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
  options = dict(num_classes=10, time_steps=T, in_channels=1, width=0.25)
  model = models.create("convnet_small", **options, rngs=nnx.Rngs(0))
  testing.randomize(model, jax.random.key(1), kernels=True)
  deployed = deploy.deploy(model, "convnet_small", **options)
  # Logits x 10: margins of the mean output of order 1-3, so that margin:2 stops examples at
  # different steps.
  for key in ("fc.kernel", "fc.bias"):
    deployed.params[key] = 10 * deployed.params[key]
  path = tmp_path_factory.mktemp("bundle") / "net.empf"
  path.write_bytes(bundle.to_bytes(deployed))
  return path


@pytest.mark.parametrize(
  "value, fragment",
  [
    ("softmax:1.5", "--exit=softmax:1.5: softmax exit threshold 1.5 is not in (0, 1]"),
    ("margin", "--exit=margin: exit rule 'margin' is not RULE:THRESHOLD"),
    ("top5:1", "unknown exit rule 'top5'; allowed: softmax, margin"),
  ],
)
def test_cli_bad_exit_value_is_one_line_error(random_bundle, value, fragment, deploy_main):
  result = deploy_main(
    f"--bundle={random_bundle}", "--evaluate", "--dataset=digits", f"--exit={value}"
  )
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_cli_exit_and_sweep_write_the_report(random_bundle, tmp_path, deploy_main):
  result = deploy_main(
    f"--bundle={random_bundle}",
    "--evaluate",
    "--dataset=digits",
    "--exit=margin:2",
    "--exit_sweep",
    f"--report_dir={tmp_path}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "early exit margin:2: accuracy" in result.stdout
  evaluation = json.loads((tmp_path / deploy_cli.EVALUATION).read_text())
  rows = json.loads((tmp_path / report.EXIT_JSON).read_text())
  assert [(row["rule"], row["threshold"]) for row in rows] == [(None, None)] + [
    (rule.kind, rule.threshold) for rule in deploy_cli.SWEEP
  ]
  assert rows == evaluation["exit_sweep"]
  everything = rows[0]
  assert everything["mean_steps"] == T and everything["stopped_per_step"] == [0, 0, 0, 1]
  assert everything["accuracy"] == evaluation["accuracy"]
  np.testing.assert_allclose(
    everything["energy_full_pj"], evaluation["operations"]["energy_full_pj"], rtol=1e-9
  )
  for row in rows:
    assert 1 <= row["mean_steps"] <= T and abs(sum(row["stopped_per_step"]) - 1) < 1e-9
    assert row["energy_full_pj"] <= everything["energy_full_pj"] * (1 + 1e-6)
  # The while loop (--exit) and the sweep (cut from all steps) agree on the same rule.
  early = evaluation["early_exit"]
  swept = next(row for row in rows if (row["rule"], row["threshold"]) == ("margin", 2.0))
  assert 1 < early["mean_steps"] < T
  assert set(early) == set(swept)
  for key, value in early.items():
    if key in ("rule", "threshold"):
      assert value == swept[key]
    else:
      np.testing.assert_allclose(value, swept[key], rtol=1e-6, err_msg=key)
  markdown = (tmp_path / report.EXIT_MARKDOWN).read_text()
  assert "| all steps |" in markdown and "| softmax:0.9 |" in markdown
  assert (tmp_path / report.EXIT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_margin_rule_equals_the_top_two_difference_ties_included():
  """The margin rule's two maxima give lax.top_k's top-1 minus top-2, also when values tie."""
  c = jax.random.randint(jax.random.key(3), (200, 5), 0, 4).astype(jnp.float32)  # many ties
  for threshold in (0.0, 1.0, 2.0):
    top2 = jax.lax.top_k(c, 2)[0]
    np.testing.assert_array_equal(
      deploy.ExitRule("margin", threshold).fires(c, 1), top2[:, 0] - top2[:, 1] >= threshold
    )
