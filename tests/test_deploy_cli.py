"""Deployment from the application: export a trained digits run, evaluate the bundle, the report.

The end-to-end tests take the digits config trained for one epoch with ``python -m
experiments.cifar`` (the run the test files share), export it with ``python -m experiments.deploy``
and evaluate the bundle file with the same program's main, as a user would; the bundle's accuracy
at every step must be the training run's. The quick tests check the efficiency report against
:func:`empf_jax.efficiency.measure` and the CLI's errors.
"""

import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from empf_jax import bundle, deploy, efficiency, models, testing, training
from experiments import deploy as deploy_cli
from experiments import input as data_input
from experiments import report
from experiments import train as driver
from experiments.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, RTOL = 1e-5, 1e-4
TEST_EXAMPLES = 360  # digits test split


def env(devices):
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  return e


def cli(*flags, devices=1, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", "experiments.deploy", *flags],
    check=False,
    cwd=ROOT,
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def small_digits_net(**options):
  """A randomised convnet_small for 8x8x1 inputs (mixed-sign kernels, random BN and neurons)."""
  options = {"num_classes": 10, "time_steps": 4, "in_channels": 1, "width": 0.25, **options}
  model = models.create("convnet_small", **options, rngs=nnx.Rngs(0))
  testing.randomize(model, jax.random.key(1), kernels=True)
  return model, options


def digits_batches(count, batch_size, *, padding=0, time_major=False, seed=0):
  """``count`` batches (x, y) like an evaluation pipeline's; the last has ``padding`` examples
  labelled -1 (filled with large values, which would change every count if they were used)."""
  rng = np.random.default_rng(seed)
  batches = []
  for i in range(count):
    shape = (batch_size, 4, 8, 8, 1) if time_major else (batch_size, 8, 8, 1)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    if i == count - 1 and padding:
      x[-padding:] = 100.0
      y[-padding:] = data_input.PAD_LABEL
    batches.append((x, y))
  return batches


# -----------------------------------------------------------------------------------------------
# The efficiency report.


def table_rows(markdown):
  """The rows of the first Markdown table (after its header and separator)."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| layer |"))
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


def test_report_matches_measure_without_padding_in_forward_order(tmp_path):
  model, _ = small_digits_net()
  batches = digits_batches(2, 6, padding=2)
  result = report.write_efficiency_report(model, batches, str(tmp_path), max_batches=None)
  # The same figures as measure() on the real examples only, fed T times.
  real = [jnp.broadcast_to(x[y >= 0][None], (4,) + x[y >= 0].shape) for x, y in batches]
  expected = efficiency.measure(model, real)
  assert result["samples"] == expected.samples == 10
  totals = result["totals"]
  np.testing.assert_allclose(
    [
      totals["sops"],
      totals["macs"],
      totals["energy_authors_pj"],
      totals["energy_full_pj"],
      totals["firing_rate"],
    ],
    [
      expected.sops,
      expected.macs,
      expected.energy_authors_pj,
      expected.energy_full_pj,
      expected.firing_rate,
    ],
    rtol=1e-6,
  )
  names = [layer["name"] for layer in result["layers"]]
  assert names == [
    "unit1.conv",
    "unit1.neuron",
    "unit2.conv",
    "unit2.neuron",
    "unit3.conv",
    "unit3.neuron",
    "fc",
  ]
  # The rows add up to the library's totals, in both energy columns.
  layers = result["layers"]
  np.testing.assert_allclose(
    sum(r["energy_authors_pj"] for r in layers), expected.energy_authors_pj, rtol=1e-6
  )
  np.testing.assert_allclose(
    sum(r["energy_full_pj"] for r in layers), expected.energy_full_pj, rtol=1e-6
  )
  np.testing.assert_allclose(sum(r["sops"] for r in layers), expected.sops, rtol=1e-6)
  np.testing.assert_allclose(
    sum(r["acs"] + r["macs"] for r in layers), expected.acs + expected.macs, rtol=1e-6
  )
  for row in layers:  # authors' convention: spike-fed operations at 0.9 pJ, nothing else
    np.testing.assert_allclose(row["energy_authors_pj"], row["sops"] * 0.9, rtol=1e-6)
  assert layers[0]["sops"] == 0 and layers[0]["macs"] > 0  # float stem fed by currents
  assert all(0 < layers[i]["rate"] < 1 for i in (1, 3, 5))

  markdown = (tmp_path / report.MARKDOWN).read_text()
  rows = table_rows(markdown)
  assert [row[0] for row in rows] == names
  assert "divided by 8" in markdown and "not applied here" in markdown
  with open(tmp_path / report.JSON) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert (tmp_path / report.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_time_major_examples_and_four_bit_discount(tmp_path):
  model, _ = small_digits_net(spike_bits=4)
  batches = digits_batches(3, 4, time_major=True)
  result = report.write_efficiency_report(model, batches, str(tmp_path), max_batches=2)
  expected = efficiency.measure(model, [np.swapaxes(x, 0, 1) for x, _ in batches[:2]])
  assert result["samples"] == 8 and result["spike_bits"] == 4
  np.testing.assert_allclose(result["totals"]["sops"], expected.sops, rtol=1e-6)
  for row in result["layers"]:
    np.testing.assert_allclose(row["energy_authors_pj"], row["sops"] * 0.9 / 8, rtol=1e-6)
  assert "(applied here)" in (tmp_path / report.MARKDOWN).read_text()


def test_report_refuses_inputs_that_do_not_fit(tmp_path):
  model, _ = small_digits_net()
  with pytest.raises(ValueError, match="3 time steps; the network has T=4"):
    report.write_efficiency_report(
      model, [(np.zeros((2, 3, 8, 8, 1)), np.zeros(2, np.int32))], str(tmp_path)
    )
  only_padding = [(np.zeros((2, 8, 8, 1)), np.full(2, data_input.PAD_LABEL, np.int32))]
  with pytest.raises(ValueError, match="at least one batch"):
    report.write_efficiency_report(model, only_padding, str(tmp_path))


# -----------------------------------------------------------------------------------------------
# CLI errors (no training needed).


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
  """A bundle of a randomised digits-shaped network, with no sidecar."""
  model, options = small_digits_net()
  path = tmp_path_factory.mktemp("random") / "net.empf"
  path.write_bytes(bundle.to_bytes(deploy.deploy(model, "convnet_small", **options)))
  return path


def test_cli_missing_workdir_is_a_clear_error(tmp_path, deploy_main):
  result = deploy_main(f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x.empf'}")
  assert_one_line_error(result, "does not exist")
  assert not (tmp_path / "x.empf").exists()


def test_cli_unknown_dataset_is_a_clear_error(random_bundle, deploy_main):
  result = deploy_main(f"--bundle={random_bundle}", "--evaluate", "--dataset=mnist")
  assert_one_line_error(result, "unknown dataset 'mnist'", "digits")


@pytest.mark.parametrize("decay_latent_weights", [True, False])
def test_restores_the_checkpoint_of_either_weight_decay_setting(tmp_path, decay_latent_weights):
  """The optimizer state is part of the checkpoint, and its structure depends on
  decay_latent_weights: the export builds the optimizer the training run built."""
  from experiments.checkpoint import Checkpoints

  config = digits.get_config()
  config.decay_latent_weights = decay_latent_weights
  model = driver.build_model(config, 10, (8, 8, 1))
  testing.randomize(model, jax.random.key(1), scale=0.1)
  _, state = training.create_train_state(model, driver.build_optimizer(config))
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  checkpoints.save(7, state, {"step": 7})
  checkpoints.close()
  restored, step = deploy_cli.restore_model(str(tmp_path), config, 10, (8, 8, 1))
  assert step == 7
  chex.assert_trees_all_equal(nnx.state(restored, nnx.Param), nnx.state(model, nnx.Param))


def test_workdir_without_checkpoint_and_bundle_without_dataset(tmp_path, random_bundle):
  with pytest.raises(deploy_cli.UsageError, match="no checkpoint in"):
    deploy_cli.restore_model(str(tmp_path), digits.get_config(), 10, (8, 8, 1))
  assert not (tmp_path / "checkpoints").exists()  # nothing is created in the workdir
  with pytest.raises(deploy_cli.UsageError, match="pass --dataset"):
    deploy_cli.evaluate(
      str(random_bundle), dataset=None, data_dir=None, batch_size=8, report_dir=str(tmp_path)
    )
  assert not os.path.exists(tmp_path / deploy_cli.EVALUATION)
  three_classes, options = small_digits_net(num_classes=3)
  arch = deploy.deploy(three_classes, "convnet_small", **options).arch
  test = data_input.load("digits", "test", batch_size=8, train=False, seed=0)
  with pytest.raises(
    deploy_cli.UsageError,
    match="has num_classes=10, the bundle's network convnet_small has num_classes=3",
  ):
    deploy_cli.check_fits(arch, test, "digits")


# -----------------------------------------------------------------------------------------------
# End to end: the model trained by the digits config.


@pytest.fixture(scope="module")
def exported(digits_one_epoch):
  """The shared digits run (one epoch on 2 devices, conftest), exported with the CLI (1 device)."""
  workdir = digits_one_epoch
  out = workdir / "deployed" / "digits.empf"
  result = cli(f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, out, result.stdout


@pytest.mark.timeout(300)
def test_export_writes_bundle_sidecar_and_report(exported):
  _, out, stdout = exported
  size = out.stat().st_size
  assert f"{size} bytes" in stdout and "by the paper's rule" in stdout and "packed" in stdout
  assert not list(out.parent.glob("*.tmp"))
  sidecar = json.loads((out.parent / (out.name + ".json")).read_text())
  assert sidecar["dataset"] == "digits" and sidecar["bytes"] == size
  assert sidecar["step"] == 1437 // 32  # one epoch: the full batches of 1,437 training images
  rows = table_rows((out.parent / report.MARKDOWN).read_text())
  assert [row[0] for row in rows] == [
    "unit1.conv",
    "unit1.neuron",
    "unit2.conv",
    "unit2.neuron",
    "unit3.conv",
    "unit3.neuron",
    "fc",
  ]
  assert (out.parent / report.PLOT).exists()


@pytest.mark.timeout(300)
def test_bundle_accuracy_equals_training_summary(exported, tmp_path, deploy_main):
  workdir, out, _ = exported
  result = deploy_main(f"--bundle={out}", "--evaluate", f"--report_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  with open(tmp_path / deploy_cli.EVALUATION) as f:
    evaluation = json.load(f)
  assert evaluation["examples"] == summary["examples"] == TEST_EXAMPLES
  assert summary["accuracy"] > 0.5  # trained, so that the comparison means something
  # Logits agree to ~1e-6, so at most an exact tie of two classes could change one prediction.
  np.testing.assert_allclose(
    evaluation["accuracy_per_step"], summary["accuracy_per_step"], atol=1.0 / TEST_EXAMPLES + 1e-12
  )
  assert re.search(r"accuracy at t = T: \d+\.\d\d %", result.stdout)


@pytest.mark.timeout(300)
def test_bundle_logits_equal_trained_model(exported):
  workdir, out, _ = exported
  config, _ = deploy_cli.read_run_config(str(workdir))
  model, step = deploy_cli.restore_model(str(workdir), config, 10, (8, 8, 1))
  assert step > 0
  deployed = bundle.from_bytes(out.read_bytes())
  graphdef, state = nnx.split(model)
  eval_logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
  test = data_input.load("digits", "test", batch_size=120, train=False, seed=0)
  for x, _ in test.epoch(0):
    x_seq = training.time_major(jnp.asarray(x), 4, static=True)
    expected = eval_logits(state, x_seq)
    got = deploy.run(deployed, x_seq)
    chex.assert_shape(got, (4, 120, 10))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    assert np.std(np.asarray(expected)) > 0.1  # a trained network, not constant logits


@pytest.mark.timeout(300)
def test_flipped_byte_is_a_clear_error(exported, tmp_path, deploy_main):
  _, out, _ = exported
  data = bytearray(out.read_bytes())
  data[len(data) // 2] ^= 0x01
  corrupted = tmp_path / "corrupted.empf"
  corrupted.write_bytes(bytes(data))
  result = deploy_main(f"--bundle={corrupted}", "--evaluate", "--dataset=digits")
  assert_one_line_error(result, "not a valid bundle", "checksum mismatch")
  assert not (tmp_path / deploy_cli.EVALUATION).exists()


def test_config_of_a_workdir_written_before_added_keys_reads_with_their_old_values(tmp_path):
  config = digits.get_config().to_dict()
  del config["model"]["step_stats"], config["bn_recalibration_batches"]
  (tmp_path / "config.json").write_text(json.dumps({"fingerprint": "f", "config": config}))
  read, fingerprint = deploy_cli.read_run_config(str(tmp_path))
  assert fingerprint == "f"
  assert read.model.step_stats is False and read.bn_recalibration_batches == 0
  expected = digits.get_config()
  expected.bn_recalibration_batches = 0  # the old behaviour; the default is 64 since
  assert read.to_dict() == expected.to_dict()


def test_config_of_a_workdir_written_with_the_old_sentinels_reads_as_none_and_resumes(tmp_path):
  # The first release wrote model.spike_bits=0 and model.stem="" where the config now has None.
  config = digits.get_config()
  legacy = config.to_dict()
  legacy["model"].update(spike_bits=0, stem="")
  # The fingerprint maps only None, so of the old values it is the one the first release wrote.
  old_fingerprint = driver.fingerprint(ml_collections.ConfigDict(legacy))
  assert driver.fingerprint(config) == old_fingerprint
  (tmp_path / "config.json").write_text(
    json.dumps({"fingerprint": old_fingerprint, "config": legacy})
  )
  read, fingerprint = deploy_cli.read_run_config(str(tmp_path))
  assert read.model.spike_bits is None and read.model.stem is None
  assert driver.fingerprint(read) == fingerprint == old_fingerprint


# -----------------------------------------------------------------------------------------------
# ONNX export of a bundle.


@pytest.mark.timeout(300)
def test_onnx_of_the_trained_digits_bundle_predicts_like_the_runtime(
  exported, tmp_path, deploy_main
):
  """The command writes a file that passes ONNX's full check; onnxruntime's predictions on the
  whole digits test set equal deploy.run's at every step."""
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  _, out, _ = exported
  path = tmp_path / "digits.onnx"
  result = deploy_main(f"--bundle={out}", f"--onnx={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "onnxruntime equals deploy.run" in result.stdout and "opset 17" in result.stdout
  model = onnx.load(str(path))
  onnx.checker.check_model(model, full_check=True)
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  deployed = bundle.from_bytes(out.read_bytes())
  test = data_input.load("digits", "test", batch_size=120, train=False, seed=0)
  for x, _ in test.epoch(0):
    x_seq = np.asarray(training.time_major(jnp.asarray(x), 4, static=True), np.float32)
    cumulative, prediction = session.run(None, {"x": x_seq})
    expected = np.cumsum(np.asarray(deploy.run(deployed, x_seq)), axis=0)
    np.testing.assert_array_equal(np.argmax(cumulative, -1), np.argmax(expected, -1))
    np.testing.assert_array_equal(prediction, np.argmax(expected[-1], -1))
    np.testing.assert_allclose(cumulative, expected, rtol=1e-4, atol=1e-5)
  # The early-exit graph: the exit steps and predictions of run_early_exit on the test set.
  path = tmp_path / "digits_exit.onnx"
  result = deploy_main(f"--bundle={out}", f"--onnx={path}", "--exit=margin:1")
  assert result.returncode == 0, result.stderr[-3000:]
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  rule, stopped_early = deploy.ExitRule.parse("margin:1"), 0
  for x, _ in test.epoch(0):
    x_seq = np.asarray(training.time_major(jnp.asarray(x), 4, static=True), np.float32)
    prediction, steps, _ = session.run(None, {"x": x_seq})
    expected = deploy.run_early_exit(deployed, x_seq, rule)
    np.testing.assert_array_equal(steps, expected.steps)
    np.testing.assert_array_equal(prediction, expected.predictions)
    stopped_early += int(np.sum(steps < 4))
  assert stopped_early > 0


def test_onnx_refuses_bad_files_and_shapes(random_bundle, tmp_path, deploy_main):
  damaged = tmp_path / "damaged.empf"
  data = bytearray(random_bundle.read_bytes())
  data[len(data) // 2] ^= 0x01
  damaged.write_bytes(bytes(data))
  foreign = tmp_path / "foreign.onnx"
  foreign.write_bytes(b"\x08\x07" + bytes(100))  # not a bundle (an ONNX-like protobuf)
  out = tmp_path / "out.onnx"
  assert_one_line_error(deploy_main(f"--bundle={damaged}", f"--onnx={out}"), "not a valid bundle")
  assert_one_line_error(deploy_main(f"--bundle={foreign}", f"--onnx={out}"), "not a valid bundle")
  assert_one_line_error(
    deploy_main(f"--bundle={random_bundle}", f"--onnx={out}"),
    "does not name the dataset",
    "--input_shape",
  )
  assert_one_line_error(
    deploy_main(f"--bundle={random_bundle}", f"--onnx={out}", "--input_shape=8,x,1"),
    "--input_shape=8,x,1",
  )
  assert_one_line_error(
    deploy_main(f"--bundle={random_bundle}", f"--onnx={out}", "--evaluate"),
    "--onnx=OUT.onnx goes with --bundle=FILE alone",
  )
  assert not out.exists()
  result = deploy_main(f"--bundle={random_bundle}", f"--onnx={out}", "--input_shape=8,8,1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert out.exists()
