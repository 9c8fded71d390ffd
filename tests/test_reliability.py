"""What long runs meet: damaged checkpoints, killed saves, NaN/Inf, bad configs, bad data, a
workdir of another run, and the need for bit-identical reruns.

Subprocess runs are ``python -m experiments.cifar`` on digits with a narrow network, as in
test_experiment.py (whose kill/resume and SIGTERM tests are not repeated here). They share a
persistent compilation cache, so the training program is compiled once for the whole module.
"""

import copy
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_experiment import (
  COMPILATION_CACHE,
  ONE_EPOCH,
  ROOT,
  checkpoint_steps,
  command,
  env,
  final_params,
)

from empf_jax import layers, models, training
from experiments import diagnose, train
from experiments.checkpoint import Checkpoints
from experiments.configs import digits, fashion_mnist, variants
from experiments.input import DataError

# One epoch of 44 batches; checkpoints every 5 batches, the newest 3 kept (35, 40, 44): the flags
# of the shared run (conftest.digits_one_epoch).
FLAGS = ONE_EPOCH


@pytest.fixture(scope="module")
def compile_cache():
  """The compilation cache of test_experiment's runs (most runs here compile the same steps)."""
  return COMPILATION_CACHE


def cli(compile_cache, workdir, *flags, timeout=300):
  """Runs the training program on 2 CPU devices; returns the CompletedProcess."""
  cache = {
    "JAX_COMPILATION_CACHE_DIR": compile_cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }
  return subprocess.run(
    command(str(workdir), *flags),
    cwd=ROOT,
    env=env(2, **cache),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def one_error_line(result, code):
  """The single ``error:`` line of a run that must fail with exit code ``code``."""
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def reference(digits_one_epoch):
  """The shared one-epoch run (conftest), trained with ``FLAGS``."""
  return digits_one_epoch


@pytest.fixture(scope="module")
def rerun(tmp_path_factory, compile_cache, reference):
  workdir = tmp_path_factory.mktemp("rerun")
  result = cli(compile_cache, workdir, *FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# --------------------------------------------------------------------------------------------------
# Determinism.


# The default suite has the same check in test_experiment's kill and resume tests (a run from
# scratch that is killed and resumed ends bit-identical to another run from scratch).
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_same_config_and_seed_give_bit_identical_parameters(reference, rerun):
  step_a, params_a = final_params(reference)
  step_b, params_b = final_params(rerun)
  assert step_a == step_b == 44
  np.testing.assert_array_equal(params_a, params_b)


# --------------------------------------------------------------------------------------------------
# Damaged and half-written checkpoints.


@pytest.mark.timeout(400)
def test_damaged_checkpoints_fall_back_and_finish_like_an_uninterrupted_run(
  tmp_path, compile_cache, reference
):
  workdir = tmp_path / "damaged"
  shutil.copytree(reference, workdir)
  assert checkpoint_steps(workdir) == [35, 40, 44]
  # 44: every array chunk truncated; 40: unreadable array metadata.
  chunks = [
    os.path.join(d, f)
    for d, _, files in os.walk(workdir / "checkpoints/44/state")
    for f in files
    if os.path.basename(d) == "d"
  ]
  assert chunks
  for path in chunks:
    os.truncate(path, os.path.getsize(path) // 2)
  (workdir / "checkpoints/40/state/_METADATA").write_text("{not json")

  result = cli(compile_cache, workdir, *FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  # One line per damaged checkpoint, and nothing else on stderr.
  warnings = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(warnings) == 2, result.stderr[-3000:]
  assert re.match(
    r"warning: checkpoint 44 in .* is unreadable \(.+\); falling back to "
    r"checkpoint 40$",
    warnings[0],
  ), warnings[0]
  assert re.match(
    r"warning: checkpoint 40 in .* is unreadable \(.+\); falling back to "
    r"checkpoint 35$",
    warnings[1],
  ), warnings[1]
  assert "resuming from step 35" in result.stdout
  # The damaged steps were trained again and saved afresh; the result is the uninterrupted one.
  assert checkpoint_steps(workdir) == [35, 40, 44]
  step, params = final_params(workdir)
  assert step == 44
  np.testing.assert_array_equal(params, final_params(reference)[1])


_KILLED_SAVE = """
import pathlib, sys
import jax.numpy as jnp
from experiments.checkpoint import Checkpoints

directory = sys.argv[1]
checkpoints = Checkpoints(directory, keep=100)
checkpoints.save(1, {"w": jnp.zeros(SIZE)}, {"step": 1})
pathlib.Path(directory, "saving").touch()
for step in range(2, 10):
  checkpoints.save(step, {"w": jnp.full(SIZE, float(step))}, {"step": step})
"""
_SIZE = 4_000_000  # 16 MB per save: a save lasts long enough to be killed inside it


@pytest.mark.timeout(180)
def test_killed_save_leaves_no_step_directory(tmp_path):
  """SIGKILL while a process saves checkpoints one after another, at moments spread over a save
  (the step's temporary directory just made, then later): every directory named after a step is
  complete and restores its values, the newest one is restored, and saving the step that was cut
  off again replaces its temporary directory."""
  abstract = {
    "w": jax.ShapeDtypeStruct(
      (_SIZE,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
  }
  cut_off = 0
  for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
    directory = tmp_path / str(delay)
    child = subprocess.Popen(
      [sys.executable, "-c", _KILLED_SAVE.replace("SIZE", str(_SIZE)), str(directory)],
      cwd=ROOT,
      env=env(1),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    try:
      while not (directory / "saving").exists() and child.poll() is None:
        time.sleep(0.005)
      while child.poll() is None and not any(
        name.endswith("orbax-checkpoint-tmp") and not name.startswith("1")
        for name in os.listdir(directory)
      ):
        time.sleep(0.001)
      time.sleep(delay)
      child.kill()
    finally:
      child.kill()
      stderr = child.communicate(timeout=60)[1]
    assert child.returncode == -9, stderr[-3000:]
    names = sorted(os.listdir(directory))
    temporary = [n for n in names if n.endswith(".orbax-checkpoint-tmp")]
    complete = sorted(int(n) for n in names if n.isdigit())
    cut_off += bool(temporary)
    checkpoints = Checkpoints(str(directory), keep=100)
    assert checkpoints.steps() == complete and complete[0] == 1
    for step in complete:
      restored, state, meta = checkpoints.restore_latest(abstract, before=step + 1)
      assert restored == step and meta == {"step": step}
      np.testing.assert_array_equal(state["w"], np.full(_SIZE, 0.0 if step == 1 else float(step)))
    step, _, _ = checkpoints.restore_latest(abstract)
    assert step == complete[-1]
    checkpoints.save(step + 1, {"w": jnp.ones(_SIZE)}, {"step": step + 1})
    checkpoints.close()
    assert sorted(os.listdir(directory)) == sorted(
      [str(s) for s in complete] + [str(step + 1), "saving"]
    )
  assert cut_off, "no kill landed inside a save; the test did not test what it says"


# --------------------------------------------------------------------------------------------------
# Numerical faults.


@pytest.mark.timeout(400)
def test_nan_stops_the_run_naming_step_time_step_and_layer(tmp_path, compile_cache):
  """A learning rate of 1e4 (1e2 in the warm-up epoch) overflows within a few batches."""
  result = cli(
    compile_cache,
    tmp_path,
    "--config.epochs=1",
    "--config.model.width=0.25",
    "--config.progress=False",
    "--config.learning_rate=1e4",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=1",
  )
  line = one_error_line(result, 3)
  match = re.match(
    r"error: non-finite value at global step (\d+) \(epoch 1, batch \d+ of 44\), "
    r"time step ([1-4]) of 4: (NaN|\+Inf|-Inf) first in (.+?); (.*)$",
    line,
  )
  assert match, line
  step, time_step, kind, where, rest = match.groups()
  step, time_step = int(step), int(time_step)
  assert re.match(r"(gradient of )?(unit[123]|fc)/|logits|loss", where), where
  assert step > 4, "the fault should come after the first checkpoint"
  # Only finite states were saved, all before the fault, and the newest is named.
  steps = checkpoint_steps(tmp_path)
  assert steps and max(steps) < step
  assert f"the last good checkpoint, step {max(steps)}, is kept in" in rest
  good_step, params = final_params(tmp_path)
  assert good_step == max(steps) and np.all(np.isfinite(params))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == step - 1 and np.all(np.isfinite(losses))
  assert [r for r in records if r["kind"] == "fault"] == [
    {
      "kind": "fault",
      "step": step,
      "checkpoint": max(steps),
      "time_step": time_step,
      "where": where,
      "value": kind,
    }
  ]


T = 3


@pytest.fixture(scope="module")
def tiny():
  """(graphdef, optimizer, state) of a width-1/8 convnet_small, T = 3."""
  model = models.create(
    "convnet_small", num_classes=10, time_steps=T, in_channels=1, width=1 / 8, rngs=nnx.Rngs(0)
  )
  optimizer = training.make_optimizer()
  graphdef, state = training.create_train_state(model, optimizer)
  return graphdef, optimizer, state


def locate(tiny, mode, x, learning_rate=0.1, seed=0, static=True):
  graphdef, optimizer, state = tiny
  config = training.StepConfig(mode=mode, time_steps=T, num_classes=10, static_input=static)
  labels = jnp.arange(x.shape[0]) % 10
  return diagnose.first_nonfinite(
    graphdef, optimizer, config, state, x, labels, learning_rate, jax.random.key(seed)
  )


def images(sequence=False):
  shape = (8, T, 8, 8, 1) if sequence else (8, 8, 8, 1)
  return layers.draw(jax.random.normal, jax.random.key(1), shape)


def seed_drawing(time_step):
  """A seed whose random-step draw for global step 0 is ``time_step`` (0-based)."""
  return next(
    s for s in range(100) if int(training.draw_time_step(jax.random.key(s), 0, T)) == time_step
  )


def test_diagnosis_reports_the_first_layer_in_forward_order(tiny):
  """A NaN pixel makes every layer non-finite; the first in forward order is the first
  convolution's input (by name, ``fc inputs`` would come first)."""
  fault = locate(tiny, "online", images().at[0, 3, 3, 0].set(jnp.nan))
  assert fault == diagnose.Fault(1, "unit1/conv inputs", "NaN")


@pytest.mark.parametrize("mode", ["online", "bptt", "random_step"])
def test_diagnosis_reports_the_time_step_of_a_fault_in_a_sequence(tiny, mode):
  """+Inf in the second frame of every sequence: time step 2, unless the random step t* is the
  first, in which case later steps are never computed and nothing is found."""
  seed = seed_drawing(0) if mode == "random_step" else 0
  fault = locate(tiny, mode, images(sequence=True).at[:, 1].set(jnp.inf), seed=seed, static=False)
  if mode == "random_step":
    assert fault is None
    fault = locate(
      tiny, mode, images(sequence=True).at[:, 1].set(jnp.inf), seed=seed_drawing(2), static=False
    )
  assert fault == diagnose.Fault(2, "unit1/conv inputs", "+Inf")


@pytest.mark.parametrize("mode", ["online", "bptt", "random_step"])
def test_diagnosis_reports_an_overflowing_update(tiny, mode):
  """An infinite learning rate: the forward pass, loss and gradients of the first trained step
  are finite, the first parameter the forward pass reads is not after the update. Random-step
  training updates only at t* (here the last step), BPTT once for all steps."""
  seed = seed_drawing(T - 1) if mode == "random_step" else 0
  fault = locate(tiny, mode, images(), learning_rate=jnp.inf, seed=seed)
  expected_step = {"online": 1, "bptt": None, "random_step": T}[mode]
  assert fault.time_step == expected_step
  assert fault.where == "unit1/conv/kernel after the update"


def test_diagnosis_of_a_finite_batch_finds_nothing(tiny):
  assert locate(tiny, "online", images()) is None


# --------------------------------------------------------------------------------------------------
# Bad configuration.


def set_key(config, key, value):
  """Sets a dotted key ("model.width") of a config; new keys are added."""
  *parents, name = key.split(".")
  setattr(functools.reduce(getattr, parents, config), name, value)


def digits_config(**changes):
  config = digits.get_config()
  config.model.width = 0.25
  for key, value in changes.items():
    set_key(config, key, value)
  return config


BAD_CONFIGS = [
  ({"dataset": "mnist3d"}, "config.dataset='mnist3d'", "digits"),
  ({"model.name": "resnet99"}, "config.model.name='resnet99'", "resnet18"),
  ({"mode": "sideways"}, "config.mode='sideways'", "online, random_step, bptt"),
  ({"time_steps": 0}, "config.time_steps=0", "an integer >= 1"),
  ({"batch_size": 0}, "config.batch_size=0", "an integer >= 1"),
  ({"batch_size": 36}, "config.batch_size=36", "a multiple of the device count 8"),
  ({"learning_rate": 0.0}, "config.learning_rate=0.0", "a finite number > 0"),
  ({"learning_rate": -0.1}, "config.learning_rate=-0.1", "a finite number > 0"),
  ({"learning_rate": float("inf")}, "config.learning_rate=inf", "a finite number > 0"),
  ({"epochs": 0}, "config.epochs=0", "an integer >= 1"),
  ({"momentum": 1.0}, "config.momentum=1.0", "[0, 1)"),
  ({"weight_decay": -1e-4}, "config.weight_decay=-0.0001", ">= 0"),
  ({"seed": -1}, "config.seed=-1", "an integer >= 0"),
  ({"bn_recalibration_batches": -5}, "config.bn_recalibration_batches=-5", "an integer >= 0"),
  ({"compute_dtype": "float16"}, "config.compute_dtype='float16'", "float32, bfloat16"),
  ({"model.spike_bits": 8}, "config.model.spike_bits=8", "None, 4 (None: floating-point spikes)"),
  ({"model.seca": 3}, "config.model.seca=3", "0, 1, 2"),
  ({"model.weights": "quaternary"}, "config.model.weights='quaternary'", "'ternary'"),
  ({"model.neuron": "izhikevich"}, "config.model.neuron='izhikevich'", "'lif'"),
  ({"model.width": 0.0}, "config.model.width=0.0", "a number > 0"),
  (
    {"model.name": "vgg11", "model.parallel": True},
    "config.model.parallel=True",
    "allowed only in: resnet18",
  ),
  ({"model.neuron": "lif", "model.mem_bn": True}, "config.model.mem_bn=True", "False"),
  ({"model.neuron": "lif", "model.spike_bits": 4}, "config.model.spike_bits=4", "None"),
  ({"model.seca": 2}, "config.model.seca=2", "0, 1"),
  ({"model.learnable_lif": True}, "config.model.learnable_lif=True", "False"),
  ({"model.stem": "imagenet"}, "config.model.stem (for convnet_small)='imagenet'", "'cifar'"),
  ({"learning_rte": 0.1}, "config.learning_rte=0.1", "did you mean config.learning_rate?"),
  ({"model.widht": 0.5}, "config.model.widht=0.5", "did you mean config.model.width?"),
]


@pytest.mark.parametrize(
  "changes,names,allowed", BAD_CONFIGS, ids=[",".join(c) for c, _, _ in BAD_CONFIGS]
)
def test_bad_config_is_one_line_naming_key_value_and_allowed(changes, names, allowed):
  with pytest.raises(train.ConfigError) as error:
    train.validate_config(digits_config(**changes))
  message = str(error.value)
  assert "\n" not in message
  assert names in message and "allowed" in message and allowed in message, message


def test_shipped_configs_and_variants_are_valid_except_parallel_without_resnet():
  """Every shipped config with every variant passes, except the parallel variant on a network
  that has no basic blocks to hold the parallel neuron: that one fails with the clear message."""
  for module in (
    "cifar10",
    "cifar100",
    "cifar10_dvs",
    "digits",
    "fashion_mnist",
    "imagenet",
    "sequential_fashion_mnist",
    "tiny_imagenet",
  ):
    get_config = __import__(f"experiments.configs.{module}", fromlist=["get_config"]).get_config
    for variant in variants.VARIANTS:
      config = get_config(variant)
      if config.model.parallel and config.model.name not in models.RESNETS:
        with pytest.raises(train.ConfigError, match=r"config\.model\.parallel=True is not allowed"):
          train.validate_config(config)
      else:
        train.validate_config(config)


def test_bad_config_fails_before_data_or_workdir_are_touched(tmp_path, monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("nothing may be loaded or built for a bad config")

  monkeypatch.setattr(train.data_input, "load", forbidden)
  monkeypatch.setattr(train, "build_model", forbidden)
  workdir = tmp_path / "new"
  for changes, _, _ in BAD_CONFIGS:
    with pytest.raises(train.ConfigError):
      train.train_and_evaluate(digits_config(**changes), str(workdir))
  assert not workdir.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
  "flags,expected",
  [
    (
      ["--config.learning_rte=0.1"],
      "error: config.learning_rte=0.1 is not allowed; allowed: the keys of "
      "experiments/configs/common.py (did you mean config.learning_rate?)",
    ),
    (
      ["--config.model.name=vgg11", "--config.model.parallel=True"],
      "error: config.model.parallel=True is not allowed with 'vgg11'; allowed only in: "
      "resnet18, resnet19, resnet34",
    ),
    (["--config.modle.width=0.5"], "error: a --config override names an unknown key: 'modle'"),
  ],
  ids=["unknown_key", "contradiction", "unknown_parent"],
)
def test_bad_config_on_the_command_line(tmp_path, compile_cache, flags, expected):
  result = cli(compile_cache, tmp_path / "w", *FLAGS, *flags)
  assert one_error_line(result, 2).startswith(expected)
  assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------------------------------
# Bad data.


def write_idx(path, array):
  """A gzipped IDX file of unsigned bytes (the MNIST format)."""
  header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fashion_dir(root, images, labels):
  """A Fashion-MNIST folder whose training split is (images, labels); a valid test split."""
  root.mkdir()
  write_idx(root / "train-images-idx3-ubyte.gz", images)
  write_idx(root / "train-labels-idx1-ubyte.gz", labels)
  write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((8, 28, 28)))
  write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(8))
  return root


@pytest.mark.parametrize(
  "images,labels,expected",
  [
    (
      np.zeros((16, 27, 27)),
      np.arange(16) % 10,
      "images have shape (16, 27, 27, 1), expected [N, 28, 28, 1]",
    ),
    (np.zeros((16, 28, 28)), np.arange(16) % 11, "labels span [0, 10], expected [0, 10)"),
    (np.zeros((0, 28, 28)), np.zeros((0,)), "the split is empty"),
  ],
  ids=["image_shape", "label_range", "empty_split"],
)
def test_bad_data_is_a_clear_data_error(tmp_path, images, labels, expected):
  config = fashion_mnist.get_config()
  config.batch_size = 8
  config.data_dir = str(fashion_dir(tmp_path / "data", images, labels))
  with pytest.raises(DataError) as error:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.timeout(120)
def test_missing_data_dir_on_the_command_line(tmp_path, compile_cache):
  result = cli(
    compile_cache,
    tmp_path,
    *FLAGS,
    "--config.dataset=fashion_mnist",
    "--config.data_dir=/nonexistent",
  )
  line = one_error_line(result, 2)
  assert line.startswith("error: fashion_mnist: missing /nonexistent/train-images-idx3-ubyte.gz")


# --------------------------------------------------------------------------------------------------
# Workdir safety.


def leaf_keys(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaf_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_fingerprint_changes_with_every_key_but_the_harmless_ones():
  base = digits.get_config()
  keys = dict(leaf_keys(base))
  assert set(train.HARMLESS_KEYS) < set(keys)
  for key, value in keys.items():
    changed = copy.deepcopy(base)
    if value is None:  # a typed placeholder (model.spike_bits, model.stem): a value of its type
      *parents, name = key.split(".")
      new = {int: 4, str: "x"}[functools.reduce(getattr, parents, base).get_type(name)]
    else:
      new = {
        bool: lambda v: not v,
        int: lambda v: v + 1,
        float: lambda v: 2 * v + 1,
        str: lambda v: v + "x",
      }[type(value)](value)
    set_key(changed, key, new)
    same = train.fingerprint(changed) == train.fingerprint(base)
    assert same == (key in train.HARMLESS_KEYS), key
  assert train.fingerprint(copy.deepcopy(base)) == train.fingerprint(base)


def test_fingerprint_of_runs_made_before_a_key_was_added_is_unchanged():
  # A workdir written before a key existed has a config without it; at its old behaviour the
  # key leaves the fingerprint alone, so that workdir still resumes.
  # Keys whose default has changed since (bn_recalibration_batches) are set to the old behaviour.
  base = digits.get_config()
  older = copy.deepcopy(base)
  for dotted, old_behaviour in train.ADDED_KEYS.items():
    *parents, key = dotted.split(".")
    section, old_section = base, older
    for parent in parents:
      section, old_section = section[parent], old_section[parent]
    section[key] = old_behaviour
    with old_section.unlocked():
      del old_section[key]
  assert train.fingerprint(older) == train.fingerprint(base)


def snapshot(workdir):
  """{relative path: (size, mtime_ns, sha256)} of every file, and every directory, under workdir."""
  out = {}
  for directory, _, files in os.walk(workdir):
    out[os.path.relpath(directory, workdir) + "/"] = None
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, workdir)] = (
        os.path.getsize(path),
        os.stat(path).st_mtime_ns,
        digest,
      )
  return out


@pytest.mark.timeout(120)
def test_refused_workdir_is_left_untouched(tmp_path, compile_cache, reference):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = snapshot(workdir)
  assert "config.json" in before and "checkpoints/44/" in before
  result = cli(compile_cache, workdir, *FLAGS, "--config.learning_rate=0.5")
  line = one_error_line(result, 2)
  assert "holds a run of a different config" in line and "--allow_config_change" in line
  assert snapshot(workdir) == before
