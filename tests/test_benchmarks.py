"""Tests of the benchmark scripts: compiled memory against T, the throughput and GPU scripts on
tiny sizes, and the maths behind the online-versus-BPTT gradient comparison."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import memory
from benchmarks.investigations import gradient_scaling as gs
from empf_jax import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NET = dict(name="convnet_small", num_classes=10, in_channels=1, weights="binary", width=1 / 8)
TINY_IMAGE = (16, 16, 1)


def _clean_env() -> dict[str, str]:
  """The environment without the eight fake devices of conftest (scripts run on one CPU)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def tiny_memory():
  return memory.sweep(
    TINY_NET, modes=("online", "bptt"), time_steps=(2, 4), batch=8, image_shape=TINY_IMAGE
  )


def test_online_memory_is_flat_and_bptt_memory_grows(tiny_memory):
  online = memory.series(tiny_memory, "online")
  bptt = memory.series(tiny_memory, "bptt")
  # Online: one step's activations whatever T; BPTT keeps every step's activations for the
  # backward pass, so doubling T nearly doubles its scratch memory.
  assert memory.relative_spread(online, 2, 4) <= 0.1, online
  assert bptt[4] >= 1.5 * bptt[2], bptt
  assert bptt[4] > online[4]
  for point in tiny_memory:
    sizes = point["bytes"]
    assert sizes["total"] == sizes["temp"] + sizes["argument"]
    assert sizes["peak"] == sizes["total"] + sizes["output"] - sizes["alias"]
    # The donated train state is reused for the new one.
    assert sizes["alias"] > 0


def test_acceptance_reports_each_criterion():
  def point(mode, steps, total, unrolled=False):
    return {"mode": mode, "time_steps": steps, "unrolled": unrolled, "bytes": {"total": total}}

  points = [
    point("online", 4, 100),
    point("online", 16, 104),
    point("random_step", 4, 100),
    point("random_step", 16, 110),
    point("bptt", 4, 100),
    point("bptt", 16, 290),
  ]
  checks = memory.acceptance(points)
  assert checks["online"]["passed"] and checks["online"]["value"] == pytest.approx(0.04)
  assert not checks["random_step"]["passed"]
  assert not checks["bptt"]["passed"] and checks["bptt"]["value"] == pytest.approx(2.9)
  assert "online (unrolled)" not in checks


def _problem(scenario: gs.Scenario, seed: int = 0) -> gs.Problem:
  return gs.make_problem(
    jax.random.key(seed), scenario, batch=6, inputs=5, neurons_=7, classes=3, time_steps=4
  )


@pytest.mark.parametrize("loss", gs.LOSSES)
@pytest.mark.parametrize("static", [True, False])
def test_online_membrane_gradient_is_the_direct_term_of_bptt(loss, static):
  """delta^on_t = H_t g_t and delta^BPTT_t = H_t g_t + lambda_{t+1} (1 - H_t) delta^BPTT_{t+1}."""
  problem = _problem(gs.Scenario("mixed", static=static), seed=int(static))
  online, _, fires = gs.gradients(problem, online=True, loss=loss)
  bptt, _, fires_bptt = gs.gradients(problem, online=False, loss=loss)
  chex.assert_shape([online, bptt, fires], (4, 6, 7))
  np.testing.assert_array_equal(fires, fires_bptt)  # the cut does not change the forward pass
  fires = np.asarray(fires)
  assert 0.1 < fires.mean() < 0.9  # both cases occur, so the identities below mean something
  np.testing.assert_array_equal(np.asarray(online)[~fires], 0.0)
  np.testing.assert_allclose(np.asarray(online)[fires], np.asarray(bptt)[fires], rtol=0, atol=1e-7)
  decay = jax.nn.sigmoid(problem.params.a)
  for t in range(3):
    expected = online[t] + decay[t + 1] * (1.0 - fires[t]) * bptt[t + 1]
    np.testing.assert_allclose(bptt[t], expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(online[-1], bptt[-1], rtol=0, atol=1e-7)
  assert float(jnp.max(jnp.abs(bptt - online))) > 1e-4  # silent neurons receive BPTT gradient


def test_lif_bptt_gradient_passes_the_surrogate_reset():
  """LIF: u_t = m_t - theta' H(m_t - theta'), so
  du_t/dm_t = 1 - theta' max(1 - |m_t - theta'|, 0)."""
  problem = _problem(gs.Scenario("lif", neuron="lif"), seed=2)
  online, _, _ = gs.gradients(problem, online=True, loss="summed", neuron="lif")
  bptt, _, _ = gs.gradients(problem, online=False, loss="summed", neuron="lif")
  _, membranes, _ = gs.forward(
    problem, problem.w, jnp.zeros_like(online), online=True, neuron="lif"
  )
  threshold = jax.nn.sigmoid(problem.params.b) + 0.5
  decay = jax.nn.sigmoid(problem.params.a)
  for t in range(3):
    surrogate = jnp.maximum(1.0 - jnp.abs(membranes[t] - threshold[t]), 0.0)
    expected = online[t] + decay[t + 1] * (1.0 - threshold[t] * surrogate) * bptt[t + 1]
    np.testing.assert_allclose(bptt[t], expected, rtol=1e-5, atol=1e-7)


def test_rescaling_is_exact_when_every_neuron_fires_and_fails_otherwise():
  problem = _problem(gs.Scenario("all fire", drive=0.05, bias=3.0))
  result = gs.compare(problem, loss="summed")
  assert all(s["firing_fraction"] == 1.0 for s in result["steps"])
  assert all(gs.pure_rescaling(result))
  assert all(s["least_squares_scale"] == pytest.approx(1.0) for s in result["steps"])
  mixed = gs.compare(_problem(gs.Scenario("mixed")), loss="summed")
  assert not all(gs.pure_rescaling(mixed))
  assert gs.pure_rescaling(mixed)[-1]
  record = gs.run(
    batch=4,
    inputs=3,
    neurons_=5,
    classes=3,
    time_steps=3,
    seed=1,
    scenarios=(gs.Scenario("all fire", drive=0.05, bias=3.0),),
  )
  assert "It held at every step in: all fire." in record["verdict"]


def _run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=_clean_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_throughput_smoke_runs_both_frameworks_on_one_core(tmp_path):
  pytest.importorskip("torch")  # the PyTorch peer (no CPU build of torch for every Python)
  # The Fashion-MNIST network: a third of ResNet-18's compile time; the cross-check pins both
  # networks' PyTorch twins.
  out = tmp_path / "throughput.json"
  done = _run_script(
    [
      "benchmarks.throughput",
      "--device=cpu",
      "--smoke",
      "--network=convnet28",
      "--modes=online",
      "--breakdown",
      f"--out={out}",
    ],
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["meta"]["cores_used"] == 1 and record["meta"]["torch_num_threads"] == 1
  assert "cpu_model" in record["meta"] or not os.path.exists("/proc/cpuinfo")
  entry = record["results"]["online"]
  for framework in ("jax", "torch"):
    seconds = entry[framework]["repeat_seconds"]
    assert len(seconds) == 2 and min(seconds) > 0
    # Median of two repeats of one batch of 4 images.
    assert entry[framework]["images_per_second"] == pytest.approx(4 / np.median(seconds), rel=1e-2)
  assert entry["jax_over_torch"] == pytest.approx(
    entry["jax"]["images_per_second"] / entry["torch"]["images_per_second"], rel=1e-2
  )
  assert set(record["goals"]) == {"online JAX/PyTorch >= 1.0", "online JAX/PyTorch >= 1.2"}
  convs = record["breakdown"]["convolutions"]
  stem = [v for k, v in convs.items() if " 1->" in k and k.endswith("input_grad")]
  assert len(stem) == 1 and stem[0]["per_step_count"] == 0  # the image needs no gradient
  for value in convs.values():
    assert value["jax_gflops"] == pytest.approx(value["gflop"] / value["jax_seconds"], rel=1e-2)
  ceiling = record["breakdown"]["ceiling"]
  assert ceiling["jax_over_torch_at_most"] == pytest.approx(
    ceiling["torch_time_step_seconds"] / ceiling["jax_convolutions_seconds"], rel=1e-2
  )
  assert ceiling["jax_convolutions_seconds"] == pytest.approx(
    sum(v["jax_seconds"] * v["per_step_count"] for v in convs.values())
  )


@pytest.mark.parametrize(
  "size,kernel,stride,padding",
  [(4, 3, 1, 1), (8, 3, 1, 1), (7, 3, 2, 1), (32, 1, 2, 0), (5, 5, 1, 2)],
)
def test_valid_tap_fraction_counts_the_taps_off_the_padding(size, kernel, stride, padding):
  from benchmarks import throughput

  # Convolving an all-ones image with an all-ones kernel counts each output's taps on the image.
  ones = jnp.ones((1, size, size, 1))
  counted = jax.lax.conv_general_dilated(
    ones,
    jnp.ones((kernel, kernel, 1, 1)),
    (stride, stride),
    [(padding, padding)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  expected = float(counted.mean()) / kernel**2
  assert throughput.valid_tap_fraction(size, kernel, stride, padding) == pytest.approx(expected)
  if padding == 0:
    assert throughput.valid_tap_fraction(size, kernel, stride, padding) == 1.0


def test_throughput_refuses_a_missing_gpu(tmp_path):
  done = _run_script(
    ["benchmarks.throughput", "--device=gpu", "--smoke", f"--out={tmp_path / 'x.json'}"],
    timeout=120,
  )
  assert done.returncode != 0
  assert "no GPU is visible" in done.stderr


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
  env = _clean_env()
  env["OUT"] = str(tmp_path)
  env["PYTHON"] = sys.executable
  done = subprocess.run(
    ["bash", "benchmarks/gpu.sh", "--dry-run"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  for name in ("fp32_b64_online", "fp32_b64_random_step", "fp32_b64_eval"):
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["meta"]["device"] == "cpu"
    (mode,) = record["results"]
    assert record["results"][mode]["jax"]["images_per_second"] > 0


def test_bn_causes_collects_the_per_epoch_records_into_a_table_and_plot(tmp_path):
  from benchmarks.investigations import bn_causes

  workdir = tmp_path / "baseline"
  workdir.mkdir()
  records = [
    {"kind": "train", "step": 10, "epoch": 0, "loss": 1.0},
    {
      "kind": "weights",
      "step": 20,
      "epoch": 0,
      "code_change/unit2/conv": 0.004,
      "code_change/unit3/conv": 0.002,
      "update_ratio/unit2/conv": 0.01,
      "update_ratio/unit3/conv": 0.03,
      "latent_abs_p50/unit2/conv": 0.02,
      "latent_abs_p50/unit3/conv": 0.04,
    },
    {
      "kind": "eval",
      "step": 20,
      "epoch": 0,
      "accuracy": 0.70,
      "accuracy_reestimated": 0.80,
      "bn_gap": 0.10,
    },
  ]
  with open(workdir / "metrics.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  read = bn_causes.read_records(str(workdir))
  assert [r["kind"] for r in read["eval"] + read["weights"]] == ["eval", "weights"]
  result = {"name": "baseline", **read}
  table = bn_causes.table([result])
  assert "| baseline | 1 | 70.00 % | 80.00 % | 10.00 | 0.300 % | 0.0200 | 3.00e-02 |" in table
  bn_causes.plot([result], str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    bn_causes.parse_args(["--workdir", str(tmp_path), "--candidates", "baseline,nope"])


@pytest.mark.parametrize("config", ["digits", "fashion_mnist", "sequential_fashion_mnist"])
def test_ablation_memory_builds_the_network_of_every_offline_config(config):
  # The network options come from the training driver's own net_options, so the mlp of
  # sequential Fashion-MNIST (in_features, per-step statistics) is built as training builds it.
  from benchmarks import config_memory

  c = config_memory.load_config(f"experiments/configs/{config}.py", ["--config.batch_size=8"])
  result = config_memory.mode_memory(c)
  assert result["network"]["name"] == c.model.name
  assert result["network"]["step_stats"] == c.model.step_stats
  assert result["bytes"]["peak"] > 0


# The training split of every shipped config's dataset as the loaders describe it: (classes,
# one example's shape, time-major), for the datasets that are not shipped with a package.
DATASET_SHAPES = {
  "cifar10": (10, (32, 32, 3), False),
  "cifar100": (100, (32, 32, 3), False),
  "cifar10_dvs": (10, (10, 48, 48, 2), True),
  "imagenet": (1000, (224, 224, 3), False),
  "tiny_imagenet": (200, (64, 64, 3), False),
}
SHIPPED_CONFIGS = sorted(
  path.stem
  for path in pathlib.Path("experiments/configs").glob("*.py")
  if "def get_config" in path.read_text()
)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_ablation_runs_one_train_step_of_every_shipped_config(config):
  from benchmarks import config_memory

  c = config_memory.load_config(
    f"experiments/configs/{config}.py", ["--config.batch_size=8", "--config.model.width=0.125"]
  )
  data = None
  if c.dataset in DATASET_SHAPES:
    num_classes, input_shape, time_major = DATASET_SHAPES[c.dataset]
    data = types.SimpleNamespace(
      num_classes=num_classes, input_shape=input_shape, time_major=time_major
    )
  result = config_memory.dry_run(c, data)
  assert result["network"]["name"] == c.model.name
  assert result["loss"].shape == () and result["loss"].dtype == jnp.float32


def test_compare_modes_collects_unfinished_runs_and_plots_accuracy_per_epoch(tmp_path):
  from benchmarks import compare_modes, memory
  from experiments.configs import digits

  workdir = tmp_path / "online"
  workdir.mkdir()
  records = [
    {"kind": "train", "step": 5, "epoch": 0, "images_per_second": 100.0},
    {
      "kind": "eval",
      "step": 10,
      "epoch": 0,
      "accuracy": 0.8,
      "accuracy_per_step": [0.7, 0.8],
      "accuracy_reestimated": 0.81,
      "train_seconds": 90.0,
    },
    {
      "kind": "eval",
      "step": 20,
      "epoch": 1,
      "accuracy": 0.85,
      "accuracy_per_step": [0.8, 0.85],
      "train_seconds": 150.0,
    },
  ]
  (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  config = digits.get_config()
  # A results file from an earlier call holds another mode, which the update keeps.
  earlier = {
    "mode": "bptt_lif",
    "finished": True,
    "accuracy": 0.9,
    "accuracy_per_step": [0.9],
    "epochs": [{"epoch": 1, "accuracy": 0.9}],
    "median_train_images_per_second": 50.0,
  }
  # And one of a rule whose workdir is gone: collecting it again must not empty its entry.
  gone = dict(earlier, mode="online_float", accuracy=0.95, accuracy_per_step=[0.95])
  results_path = tmp_path / "out" / "compare.json"
  results_path.parent.mkdir()
  results_path.write_text(json.dumps({"meta": {}, "results": [earlier, gone]}))
  compare_modes.main(
    [
      "--workdir",
      str(tmp_path),
      "--modes",
      "online,random_step,online_float",
      "--collect",
      "--results",
      str(results_path),
      "--config",
      "experiments/configs/digits.py",
    ]
  )
  results = json.loads(results_path.read_text())["results"]
  online, missing, kept, kept_gone = results
  assert kept_gone == dict(gone, train_seconds=None)
  assert not online["finished"] and online["accuracy"] == 0.85
  assert [e["epoch"] for e in online["epochs"]] == [1, 2]
  assert online["epochs"][0]["accuracy_reestimated"] == 0.81
  assert online["train_seconds"] == 240.0
  network = {
    "name": config.model.name,
    "num_classes": 10,
    "in_channels": 1,
    "width": config.model.width,
    "weights": config.model.weights,
    "neuron": config.model.neuron,
  }
  expected = memory.train_step_memory(
    network,
    mode=config.mode,
    time_steps=config.time_steps,
    batch=config.batch_size,
    image_shape=(8, 8, 1),
  )
  assert online["train_step_memory_bytes"] == expected["bytes"]["total"]
  assert missing["epochs"] == [] and missing["accuracy"] is None
  assert kept == dict(earlier, train_seconds=None)
  mib = expected["bytes"]["total"] / 2**20
  text = (tmp_path / "out" / "compare.md").read_text()
  assert f"| online (epoch 2) | 85.00 % | 80.0, 85.0 | 4 min | 100 | {mib:.0f} MiB |" in text
  assert "| bptt_lif | 90.00 % | 90.0 | - | 50 | - |" in text
  # The memory of a rule comes from its flags: the LIF neuron and BPTT change the train step.
  lif = compare_modes.step_memory(
    ["--config=experiments/configs/digits.py", "--config.mode=bptt", "--config.model.neuron=lif"]
  )
  assert lif != expected["bytes"]["total"]
  assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_kernel_grad_forms_compute_the_kernel_gradient():
  """The other forms of dL/dw timed by conv_cpu --kernel_grad_forms equal the library's rule
  (and so the native gradient) on a small layer."""
  from benchmarks.investigations import conv_cpu

  layer = conv_cpu.Layer("small", 2, 6, 3, 4, 3, 1, 1)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 6, 3), np.float32)
  w = rng.standard_normal((3, 3, 3, 4), np.float32)
  g = rng.standard_normal((2, 6, 6, 4), np.float32)
  native = jax.vjp(
    lambda w: jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ),
    w,
  )[1](g)[0]
  forms = conv_cpu.kernel_grad_forms(layer)
  for name, fn in forms.items():
    if not name.startswith("forward"):
      np.testing.assert_allclose(fn(x, w, g), native, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("size", [4, 6])
def test_padding_forms_compute_the_convolution_and_its_gradients(size):
  """conv_cpu --padding_forms: the per-tap form (padding skipped) and Winograd F(2x2, 3x3) give
  the library's convolution and gradients."""
  from benchmarks.investigations import conv_cpu

  layer = conv_cpu.Layer("small", 2, size, 3, 5, 3, 1, 1)
  x, w, g = conv_cpu.layer_arrays(layer, jax.devices("cpu")[0])

  def value_and_grad(conv):
    return jax.value_and_grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1))(x, w)

  library = value_and_grad(lambda x, w: ops.conv2d(x, w, 1, 1))
  for conv in (conv_cpu.valid_taps_conv(layer), conv_cpu.winograd_conv(layer)):
    np.testing.assert_allclose(conv(x, w), ops.conv2d(x, w, 1, 1), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(value_and_grad(conv)), jax.tree.leaves(library)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_xla_options_batch_split_and_fusion_count():
  """conv_cpu --xla_options: the batch split computes the same loss and gradients as one
  convolution, and the fusion count reads a library fusion where XLA made one (and none in a
  program without convolutions handed to a library)."""
  from benchmarks.investigations import conv_cpu

  layer = conv_cpu.Layer("small", 8, 6, 3, 4, 3, 1, 1)
  x, w, g = conv_cpu.layer_arrays(layer, jax.devices("cpu")[0])
  one = jax.jit(conv_cpu._layer_functions(layer)["value_and_grad"])(x, w, g)
  for parts in conv_cpu.SPLIT_PARTS:
    split = jax.jit(conv_cpu.split_batch(layer, parts))(x, w, g)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(one)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{parts} parts")

  class Compiled:
    def __init__(self, text):
      self.text = text

    def as_text(self):
      return self.text

  text = (
    '%f = f32[8] fusion(%a), kind=kCustom, backend_config={"fusion_config":'
    '{"kind":"__ynn_fusion"},"outer_dimension_partitions":[]}\n'
  ) * 2
  assert conv_cpu.library_fusions(Compiled(text)) == {"__ynn_fusion": 2}
  plain = jax.jit(lambda v: v * 2.0).lower(jnp.ones(4)).compile()
  assert conv_cpu.library_fusions(plain) == {}


def test_profile_cpu_names_the_kind_and_line_of_each_instruction():
  from benchmarks.investigations import profile_cpu

  def f(x, w):
    y = jnp.sum(jnp.tanh(x), axis=(1, 2))  # a reduction
    return jnp.dot(y, w)  # a matrix product

  x, w = jnp.ones((8, 6, 6, 16)), jnp.ones((16, 4))
  table = profile_cpu.instructions(jax.jit(f).lower(x, w).compile().as_text())
  kinds = {entry["kind"] for entry in table.values()}
  assert {"dot", "reduction"} <= kinds, table
  here = os.path.relpath(__file__, REPO)
  dot = [e for e in table.values() if e["kind"] == "dot"]
  assert dot and all(e["source"].startswith(here + ":") for e in dot), dot


def test_profile_cpu_smoke_traces_the_train_step(tmp_path):
  from benchmarks.investigations import profile_cpu

  out = tmp_path / "profile.json"
  record = profile_cpu.main(["--smoke", "--network=convnet28", "--top=5", f"--out={out}"])
  assert json.loads(out.read_text())["meta"]["mode"] == "online"
  assert record["step_wall_seconds"] > 0 and record["traced_seconds"] > 0
  assert len(record["instructions"]) == 5 and len(record["sources"]) <= 5
  seconds = [entry["seconds"] for entry in record["instructions"]]
  assert seconds == sorted(seconds, reverse=True)
  assert sum(v["seconds"] for v in record["kinds"].values()) == pytest.approx(
    record["traced_seconds"]
  )
  assert any(entry["source"].startswith("empf_jax/") for entry in record["instructions"])


def test_batch_last_forms_are_the_transpose_and_the_library_form_is_restored(tmp_path):
  from benchmarks.investigations import batch_last_forms

  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
  for name, form in batch_last_forms.forms().items():
    np.testing.assert_array_equal(form(x), np.transpose(np.asarray(x), (3, 1, 2, 0)), name)
  library = ops.batch_last
  record = batch_last_forms.main(
    [
      "--network=convnet28",
      "--batch=2",
      "--rounds=1",
      "--width=0.0625",
      f"--out={tmp_path / 'forms.json'}",
    ]
  )
  assert ops.batch_last is library
  assert record["forms"][batch_last_forms.LIBRARY]["speed_relative_to_library"] == 1.0
  assert set(record["forms"]) == set(batch_last_forms.forms())


def test_inference_smoke_runs_three_runtimes_that_agree(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("onnxruntime")
  out = tmp_path / "inference.json"
  done = _run_script(["benchmarks.inference", "--smoke", f"--out={out}"], timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  entry = record["results"]["1_cores"]["convnet28"]["2"]
  for runtime in ("onnxruntime", "jax", "torch"):
    assert entry[runtime]["examples_per_second"] > 0
    assert len(entry[runtime]["per_process"]) == 1  # --smoke: the core count ran once
    assert entry[runtime]["predictions_equal_to_jax"] == 1.0  # the same weights, the same answer
  assert entry["fastest"] in ("onnxruntime", "jax", "torch")


def test_prepare_cifar_times_the_conversion_of_an_archive_it_writes(tmp_path):
  from benchmarks import prepare_cifar

  out = tmp_path / "record.json"
  record = prepare_cifar.main([f"--workdir={tmp_path}", "--per_batch=20", f"--out={out}"])
  assert record["examples"] == {"train": 100, "test": 20}
  assert record["prepared_bytes"] > 120 * 3072  # the images of both splits, as uint8
  assert record["convert_seconds"] >= 0 and record["read_train_seconds"] >= 0
  assert json.loads(out.read_text()) == record
  assert list(tmp_path.iterdir()) == [out]  # the archive and the arrays are removed
