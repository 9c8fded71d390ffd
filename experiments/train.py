"""The training driver: data-parallel online training with checkpoints, metrics and resumption.

``train_and_evaluate(config, workdir)`` trains per ``config`` and writes into ``workdir``:
``checkpoints/`` (Orbax), ``metrics.jsonl``, TensorBoard event files, ``config.json`` (with its
fingerprint) and ``summary.json``. Rerunning with the same workdir resumes from the newest
readable checkpoint, mid-epoch, with the same data order and random streams.

What a long run meets, and what the driver does:

* a bad configuration: :func:`validate_config` rejects it before any data is read or anything is
  compiled (:class:`ConfigError`, naming the key, the value and what is allowed);
* a workdir that holds another config: refused before anything in it is written;
* a NaN or Inf: every training step also reduces ``isfinite`` over its loss and new state on the
  device; the driver reads that flag one step late (so the device never waits) and before every
  checkpoint, so only finite states are saved. On a fault it restores the last good checkpoint,
  replays the batches up to the failing one, locates the first non-finite value with
  :func:`experiments.diagnose.first_nonfinite` and raises :class:`NumericalError`;
* SIGTERM/SIGINT: a checkpoint at the end of the current batch, then a clean exit; in a
  multi-process run every process stops and saves at the same batch (:mod:`experiments.interrupt`);
* a damaged checkpoint: see :mod:`experiments.checkpoint`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from empf_jax import accounting, dispatch, models, training
from experiments import diagnose, report
from experiments import input as data_input
from experiments.checkpoint import Checkpoints
from experiments.configs import common
from experiments.files import atomic_file
from experiments.interrupt import Interrupt
from experiments.metrics import MetricWriter

HARMLESS_KEYS = (
  "checkpoint_every_steps",
  "keep_checkpoints",
  "log_every_steps",
  "eval_every_epochs",
  "progress",
  "data_dir",
  "bn_check_batches",
  "input_workers",
)
# The model options of the first release. Every later option (a field added to NetOptions) has a
# default that builds the network as before it existed (NetOptions' docstring), so it is an added
# key below without being listed: adding a model option is one edit, in NetOptions.
FIRST_MODEL_KEYS = (
  "name",
  "stem",
  "neuron",
  "weights",
  "mem_bn",
  "parallel",
  "spike_bits",
  "seca",
  "learnable_lif",
  "width",
)
# Keys added after the first release, with the value that reproduces runs made without them: left
# out of the fingerprint while they hold it, so that those runs' workdirs still resume.
ADDED_KEYS = {
  "bn_recalibration_batches": 0,
  "decay_latent_weights": True,
  "bn_check_batches": 64,
  **{
    f"model.{key}": value
    for key, value in common.model_config().items()
    if key not in FIRST_MODEL_KEYS
  },
}
# The first release wrote "floating-point spikes" as model.spike_bits=0 and "the network's default
# stem" as model.stem="", where the library (and the config now) write None: the fingerprint
# hashes None as the old spelling, so that those runs' workdirs still resume, and saved configs
# read back with None.
LEGACY_SENTINELS = {"model.spike_bits": 0, "model.stem": ""}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# A configuration value that is not allowed; the message names key, value and what is allowed.
# The model's options raise it from NetOptions; the training keys from validate_config.
ConfigError = models.ConfigError


class NumericalError(FloatingPointError):
  """Training produced a NaN or Inf.

  Attributes:
    step: global step (batches trained, counting the failing one) at which it appeared.
    fault: where it first appeared in the step-by-step replay, or None if that stayed finite.
    checkpoint: step of the newest checkpoint kept (all of them are finite), or None.
  """

  def __init__(
    self, message: str, *, step: int, fault: diagnose.Fault | None, checkpoint: int | None
  ):
    super().__init__(message)
    self.step = step
    self.fault = fault
    self.checkpoint = checkpoint


def _section(values: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
  """The nested dict holding the dotted key ``a.b.c`` of ``values``, and its last part."""
  *parents, key = dotted.split(".")
  for parent in parents:
    values = values[parent]
  return values, key


def with_added_keys(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A saved config (plain dict) as a ConfigDict, keys added since it was written set to the
  values that reproduce it (:data:`ADDED_KEYS`)."""
  values = json.loads(json.dumps(values))
  for dotted, old_behaviour in ADDED_KEYS.items():
    section, key = _section(values, dotted)
    section.setdefault(key, old_behaviour)
  for dotted, legacy in LEGACY_SENTINELS.items():
    section, key = _section(values, dotted)
    if section.get(key) == legacy:
      section[key] = None
  return ml_collections.ConfigDict(values)


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of every config value that changes the result (harmless keys left out)."""
  values = config.to_dict()
  for key in HARMLESS_KEYS:
    values.pop(key, None)
  for dotted, legacy in LEGACY_SENTINELS.items():
    section, key = _section(values, dotted)
    if key in section and section[key] is None:
      section[key] = legacy
  for dotted, old_behaviour in ADDED_KEYS.items():
    section, key = _section(values, dotted)
    if section.get(key, old_behaviour) == old_behaviour:
      section.pop(key, None)
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of every leaf of a (nested) config."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every key of a training config before any data is read or anything is compiled.

  Checks that the keys are exactly those of :func:`experiments.configs.common.base_config`, that
  every training value has its type and range and that the batch splits over the devices; the
  model's options (``config.model``) are checked by :class:`empf_jax.models.NetOptions`, their
  one description (through :func:`net_options`).

  Raises:
    ConfigError: one line naming the first bad key, its value and what is allowed.
  """

  def fail(key, value, allowed):
    raise ConfigError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")

  known = _flat_config(common.base_config())
  given = _flat_config(config)
  for key in given:
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f" (did you mean config.{close[0]}?)" if close else ""
      fail(key, given[key], f"the keys of experiments/configs/common.py{hint}")
  for key in known:
    if key not in given:
      raise ConfigError(
        f"config.{key} is missing; every key of experiments/configs/common.py is required"
      )

  if config.dataset not in data_input.LOADERS:
    fail("dataset", config.dataset, ", ".join(sorted(data_input.LOADERS)))
  if config.mode not in training.MODES:
    fail("mode", config.mode, ", ".join(training.MODES))
  if config.compute_dtype not in DTYPES:
    fail("compute_dtype", config.compute_dtype, ", ".join(DTYPES))
  if not isinstance(given["data_dir"], str):
    fail("data_dir", given["data_dir"], "a string ('' for the default)")
  for key in ("augment", "nesterov", "mix", "progress", "decay_latent_weights"):
    if not isinstance(given[key], bool):
      fail(key, given[key], "True, False")
  for key in (
    "time_steps",
    "batch_size",
    "epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
    "eval_every_epochs",
  ):
    if not models.is_integer(given[key]) or given[key] < 1:
      fail(key, given[key], "an integer >= 1")
  for key in ("warmup_epochs", "seed", "bn_recalibration_batches", "bn_check_batches"):
    if not models.is_integer(given[key]) or given[key] < 0:
      fail(key, given[key], "an integer >= 0")
  if not models.is_integer(config.input_workers) or config.input_workers < -1:
    fail("input_workers", config.input_workers, "an integer >= 0, or -1 for the dataset's default")
  if not (models.is_real(config.learning_rate) and config.learning_rate > 0):
    fail("learning_rate", config.learning_rate, "a finite number > 0")
  if not (models.is_real(config.weight_decay) and config.weight_decay >= 0):
    fail("weight_decay", config.weight_decay, "a finite number >= 0")
  if not (models.is_real(config.momentum) and 0 <= config.momentum < 1):
    fail("momentum", config.momentum, "a number in [0, 1)")
  if not (models.is_real(config.warmup_start) and 0 < config.warmup_start <= 1):
    fail("warmup_start", config.warmup_start, "a number in (0, 1]")
  if not (models.is_real(config.label_smoothing) and 0 <= config.label_smoothing < 1):
    fail("label_smoothing", config.label_smoothing, "a number in [0, 1)")
  net_options(config, num_classes=1, step_shape=(1,))
  devices = jax.device_count()
  if config.batch_size % devices:
    fail(
      "batch_size",
      config.batch_size,
      f"a multiple of the device count {devices} (data-parallel over all devices)",
    )


def step_shape(data: data_input.Batches) -> tuple[int, ...]:
  """The shape of one example at one time step, e.g. (H, W, C)."""
  return tuple(data.input_shape[1:] if data.time_major else data.input_shape)


def net_options(
  config: ml_collections.ConfigDict, num_classes: int, step_shape: tuple[int, ...]
) -> models.NetOptions:
  """The network of ``config.model`` for examples of ``step_shape`` per time step: the one place
  a config becomes :class:`empf_jax.models.NetOptions` (which checks the options).

  Raises:
    ConfigError: naming the option (``config.model.<key>``), its value and what is allowed.
  """
  m = config.model
  options = {key: m[key] for key in m if key != "name"}
  options.update(
    time_steps=config.time_steps,
    num_classes=num_classes,
    in_channels=step_shape[-1],
    in_features=math.prod(step_shape),
  )
  try:
    return models.NetOptions.of(m.name, **options)
  except models.ConfigError as error:
    raise ConfigError(f"config.model.{error}") from None


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of ``config``; its state is part of every checkpoint, so training and every
  program that restores a checkpoint build it here."""
  return training.make_optimizer(
    momentum=config.momentum,
    weight_decay=config.weight_decay,
    nesterov=config.nesterov,
    learning_rate=config.learning_rate,
    decay_latent=config.decay_latent_weights,
  )


def step_config(
  config: ml_collections.ConfigDict, num_classes: int, static_input: bool
) -> training.StepConfig:
  """The training rule of ``config`` as :class:`empf_jax.training.StepConfig`: its mode, T,
  label smoothing, mixing and compute dtype, for ``num_classes`` classes and static or
  time-major input."""
  return training.StepConfig(
    mode=config.mode,
    time_steps=config.time_steps,
    num_classes=num_classes,
    static_input=static_input,
    label_smoothing=config.label_smoothing,
    mix=config.mix,
    compute_dtype=DTYPES[config.compute_dtype],
  )


def build_model(
  config: ml_collections.ConfigDict, num_classes: int, step_shape: tuple[int, ...]
) -> models.SpikingNetwork:
  """The network of ``config.model`` (options checked by :func:`net_options`)."""
  return models.create(net_options(config, num_classes, step_shape), rngs=nnx.Rngs(config.seed))


def _batch_parts(batch):
  """(x, y, mask) from an evaluation batch (x, y) whose padding examples have negative labels."""
  x, y = batch
  return x, np.maximum(y, 0), data_input.valid_mask(y).astype(np.float32)


def _all_finite(tree: Any) -> jax.Array:
  """True iff every floating-point leaf of ``tree`` is finite (one reduction on the device)."""
  checks = [
    jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(tree)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def checked_step(train_step: Callable) -> Callable:
  """Wraps a training step so that it also returns ``finite``: whether the batch's loss and the
  whole new state (parameters, statistics, optimizer state) are finite.

  A non-finite gradient always reaches the parameters through the update, so this covers losses
  and gradients; the reduction is fused into the step.
  """

  def step(state, x, labels, learning_rate, seed_key):
    state, out = train_step(state, x, labels, learning_rate, seed_key)
    return state, out, jnp.isfinite(out.loss) & _all_finite(state)

  return step


class OnMesh:
  """A jitted step traced, lowered and run with ``mesh`` set (:func:`jax.set_mesh`), so that
  the model's time folds keep the batch split over the mesh's devices
  (:func:`empf_jax.ops.fold_time`) instead of gathering it."""

  def __init__(self, mesh: jax.sharding.Mesh, jitted: Callable):
    self.mesh = mesh
    self.jitted = jitted

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit_train_step(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  step_config: training.StepConfig,
  mesh: jax.sharding.Mesh,
) -> OnMesh:
  """The training program's data-parallel train step: the train state replicated and donated,
  the batch split over the mesh's ``data`` axis, the finiteness check of :func:`checked_step`.
  ``benchmarks.communication`` compiles this same step to read its collectives."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  return OnMesh(
    mesh,
    jax.jit(
      checked_step(training.make_train_step(graphdef, optimizer, step_config)),
      in_shardings=(replicated, batch, batch, None, None),
      out_shardings=(replicated, replicated, replicated),
      donate_argnums=0,
    ),
  )


def jit_eval_step(
  graphdef: nnx.GraphDef, step_config: training.StepConfig, mesh: jax.sharding.Mesh
) -> OnMesh:
  """The training program's data-parallel evaluation step: state replicated; inputs, labels and
  mask split over the mesh's ``data`` axis; the result replicated."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  return OnMesh(
    mesh,
    jax.jit(
      training.make_eval_step(graphdef, step_config),
      in_shardings=(replicated, batch, batch, batch),
      out_shardings=replicated,
    ),
  )


class Trainer:
  """Holds the compiled steps, the mesh and the state of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    common = dict(
      seed=config.seed,
      data_dir=config.data_dir or None,
      process_index=self.process_index,
      process_count=self.process_count,
      num_workers=None if config.input_workers < 0 else config.input_workers,
    )
    self.train_data = data_input.load(
      config.dataset,
      "train",
      batch_size=config.batch_size,
      train=True,
      augment=config.augment,
      **common,
    )
    self.test_data = data_input.load(
      config.dataset, "test", batch_size=config.batch_size, train=False, augment=False, **common
    )
    shape = self.train_data.input_shape
    if self.train_data.time_major and shape[0] != config.time_steps:
      raise ConfigError(
        f"config.time_steps={config.time_steps} is not allowed for "
        f"{config.dataset!r}; allowed: {shape[0]} (its examples have "
        f"{shape[0]} time steps)"
      )
    self.step_config = step_config(
      config, self.train_data.num_classes, static_input=not self.train_data.time_major
    )
    self.optimizer = build_optimizer(config)
    self.mesh = jax.make_mesh(
      (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.state = self.initial_state()
    self.seed_key = jax.random.key(config.seed)
    self._learning_rates: dict[int, float] = {}
    self._train_step = jit_train_step(self.graphdef, self.optimizer, self.step_config, self.mesh)
    self._recalibrate_step = OnMesh(
      self.mesh,
      jax.jit(
        training.make_recalibrate_step(self.graphdef, self.step_config),
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=self.replicated,
      ),
    )
    self._eval_step = jit_eval_step(self.graphdef, self.step_config, self.mesh)

  def initial_state(self) -> training.TrainState:
    """The state before training (a fresh model from the seed), replicated on the mesh; also
    sets ``self.model`` and ``self.graphdef``."""
    self.model = build_model(self.config, self.train_data.num_classes, step_shape(self.train_data))
    self.graphdef, state = training.create_train_state(self.model, self.optimizer)
    return jax.device_put(state, self.replicated)

  def learning_rate(self, epoch: int) -> float:
    if epoch not in self._learning_rates:
      c = self.config
      self._learning_rates[epoch] = float(
        training.epoch_learning_rate(
          epoch,
          base=c.learning_rate,
          epochs=c.epochs,
          warmup_epochs=c.warmup_epochs,
          warmup_start=c.warmup_start,
        )
      )
    return self._learning_rates[epoch]

  def global_batch(self, *arrays: np.ndarray) -> list[jax.Array]:
    """Assembles each process's slice of the global batch into one sharded array."""
    return [
      jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(a)) for a in arrays
    ]

  def train_batch(
    self, x: np.ndarray, y: np.ndarray, epoch: int
  ) -> tuple[training.StepOutput, jax.Array]:
    """One training step on this process's slice of a global batch: (metrics, finite flag).

    Both are left on the device (read them later, so that the next step is already queued).
    """
    x, y = self.global_batch(x, y.astype(np.int32))
    self.state, out, finite = self._train_step(
      self.state, x, y, jnp.float32(self.learning_rate(epoch)), self.seed_key
    )
    return out, finite

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's slice of the training batch that makes global step ``step`` (1-based)."""
    epoch, position = divmod(step - 1, self.train_data.batches_per_epoch)
    return next(iter(self.train_data.epoch(epoch, start=position)))

  def reestimated(self, count: int, start: int = 0) -> training.TrainState:
    """The current state with every BatchNorm running average reset and re-estimated from
    ``count`` training batches of epoch 0's order from batch ``start`` on (at most to the end of
    that epoch), parameters frozen; ``self.state`` is left as it is."""
    state = jax.device_put(training.reset_batch_stats(self.graphdef, self.state), self.replicated)
    inflight = dispatch.InFlight()
    for _, (x, _labels) in zip(range(count), self.train_data.epoch(0, start=start)):
      state = self._recalibrate_step(state, *self.global_batch(x))
      inflight.push(state)
    return state

  def recalibrate_batch_stats(self) -> None:
    """With ``config.bn_recalibration_batches`` = N > 0: resets every BatchNorm running average
    and re-estimates it from the first N training batches of epoch 0 (at most one epoch) with
    the parameters frozen, so the averages depend on the current weights only. N = 0: nothing."""
    if self.config.bn_recalibration_batches:
      self.state = self.reestimated(self.config.bn_recalibration_batches)

  def check_batch_stats(self) -> dict[str, Any] | None:
    """With ``config.bn_check_batches`` = N > 0: the test accuracy with BatchNorm averages
    re-estimated from N training batches, computed on a copy: the N batches after those
    :meth:`recalibrate_batch_stats` uses, or (an epoch too short for both) the first N; None
    when N = 0."""
    count = self.config.bn_check_batches
    if not count:
      return None
    used = self.config.bn_recalibration_batches
    start = used if used + count <= self.train_data.batches_per_epoch else 0
    result = self.evaluate(self.reestimated(count, start=start), details=False)
    return {
      "accuracy_reestimated": result["accuracy"],
      "accuracy_per_step_reestimated": result["accuracy_per_step"],
      "loss_reestimated": result["loss"],
    }

  def evaluate(
    self, state: training.TrainState | None = None, *, details: bool = True
  ) -> dict[str, Any]:
    """Accuracy at every step, loss, firing rate per layer, learned decay/threshold, of
    ``state`` (default: the current one); ``details=False`` leaves out the neuron scalars."""
    state = self.state if state is None else state
    totals, inflight = None, dispatch.InFlight()
    for batch in self.test_data.epoch(0):
      x, y, mask = _batch_parts(batch)
      x, y, mask = self.global_batch(x, y.astype(np.int32), mask.astype(np.float32))
      totals = dispatch.accumulate(totals, self._eval_step(state, x, y, mask))
      inflight.push(totals)
    totals = jax.device_get(totals)
    count = float(totals.count)
    accuracy = [float(c) / count for c in totals.correct]
    rates = {
      name: float(totals.spikes[name]) / float(totals.elements[name]) for name in totals.spikes
    }
    result = {
      "accuracy_per_step": accuracy,
      "accuracy": accuracy[-1],
      "loss": float(totals.loss) / count,
      "examples": int(count),
      "firing_rate": rates,
    }
    if details:
      model = training.merge(self.graphdef, jax.device_get(state))
      result["neuron_scalars"] = training.learned_neuron_scalars(model)
    return result

  def weight_statistics(self) -> dict[str, float]:
    """Flat {``latent_abs_<stat>/<kernel>``: value} of the binary/ternary latent kernels'
    magnitudes (:func:`empf_jax.training.latent_magnitudes`)."""
    magnitudes = training.latent_magnitudes(jax.device_get(self.state.params))
    return {
      f"latent_abs_{stat}/{name}": value
      for name, entry in magnitudes.items()
      for stat, value in entry.items()
    }

  def model_sizes(self) -> dict[str, float]:
    return {
      "params_mb_paper": accounting.param_megabytes(self.model),
      "params_mb_packed": accounting.packed_megabytes(self.model),
    }


def _meta(config, step, epoch, position) -> dict:
  return {
    "step": int(step),
    "epoch": int(epoch),
    "batch_in_epoch": int(position),
    "fingerprint": fingerprint(config),
  }


def check_workdir(
  config: ml_collections.ConfigDict, workdir: str, allow_other_config: bool
) -> None:
  """Refuses a workdir that holds a run of a different config (fingerprint mismatch); reads only.

  Raises:
    ConfigError: the fingerprints differ and ``allow_other_config`` is False.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  if saved.get("fingerprint") != fingerprint(config) and not allow_other_config:
    raise ConfigError(
      f"workdir {workdir} holds a run of a different config (fingerprint "
      f"{saved.get('fingerprint')} != {fingerprint(config)}); use another --workdir, or pass "
      "--allow_config_change to continue this run with the new config"
    )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json`` (config and fingerprint) atomically, on process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with atomic_file(path) as f:
    json.dump(
      {"fingerprint": fingerprint(config), "config": config.to_dict()}, f, indent=2, default=str
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  eval_only: bool = False,
  allow_config_change: bool = False,
) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has checkpoints), evaluates and returns the summary.

  The summary is ``{"interrupted": signal number}`` if a signal stopped training (after a
  checkpoint).

  Raises:
    ConfigError: bad config, or a workdir of another config (nothing is read or written first).
    experiments.input.DataError: missing or malformed data.
    experiments.checkpoint.CheckpointError: checkpoints exist but none can be read.
    NumericalError: a NaN or Inf in training; no checkpoint after the last finite state is kept.
  """
  validate_config(config)
  if not eval_only:
    check_workdir(config, workdir, allow_config_change)
  trainer = Trainer(config, workdir)
  if not eval_only:
    write_config(config, workdir)
  checkpoints = Checkpoints(
    os.path.join(os.path.abspath(workdir), "checkpoints"), keep=config.keep_checkpoints
  )
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), trainer.state
  )
  writer = None
  try:
    restored = checkpoints.restore_latest(abstract, delete_unreadable=True)
    start_step = 0
    if restored is not None:
      start_step, trainer.state, meta = restored
      print(
        f"resuming from step {start_step} (epoch {meta['epoch']}, batch {meta['batch_in_epoch']})",
        flush=True,
      )
    elif eval_only:
      raise ConfigError(f"--eval_only: no checkpoint in {workdir}/checkpoints")
    if eval_only:
      trainer.recalibrate_batch_stats()
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    if not eval_only:
      try:
        signum = _train_loop(trainer, checkpoints, writer, start_step)
      except _NonFinite as nonfinite:
        error = _locate_fault(trainer, checkpoints, abstract, nonfinite.step)
        located = error.fault._asdict() if error.fault is not None else {}
        writer.write(
          "fault",
          {
            "step": error.step,
            "checkpoint": error.checkpoint,
            "time_step": located.get("time_step"),
            "where": located.get("where"),
            "value": located.get("kind"),
          },
        )
        raise error from None
      if signum is not None:
        return {"interrupted": signum}
    summary = trainer.evaluate()
    summary.update(trainer.model_sizes())
    summary["step"] = int(trainer.state.step)
    if jax.process_index() == 0:
      model = training.merge(trainer.graphdef, jax.device_get(trainer.state))
      efficiency = report.write_efficiency_report(model, trainer.test_data.epoch(0), workdir)
      summary["energy_pj_per_example"] = {
        "authors": efficiency["totals"]["energy_authors_pj"],
        "full": efficiency["totals"]["energy_full_pj"],
      }
    writer.write_summary(summary)
    return summary
  finally:
    if writer is not None:
      writer.close()
    checkpoints.close()


class _NonFinite(Exception):
  """The fused step that made global step ``step`` returned a non-finite loss or state."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def _log_window(
  trainer: Trainer,
  writer: MetricWriter,
  bar: Any,
  sums: training.StepOutput,
  logged: Any,
  in_window: int,
  rate: float,
  step: int,
  epoch: int,
) -> Any:
  """Writes the ``train`` record of the logging window that ends at ``step`` (means of the
  window's steps: differences of the running sums) and shows it on the progress bar; returns the
  sums read, the start of the next window."""
  current = jax.device_get(sums)
  means = _window_means(current, logged, in_window)
  record = {
    "step": step,
    "epoch": epoch,
    "loss": float(means.loss),
    "train_accuracy": float(means.accuracy),
    "images_per_second": rate,
    "learning_rate": trainer.learning_rate(epoch),
    **_prefixed("code_change", means.code_change),
  }
  writer.write("train", record)
  bar.set_postfix(
    loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}", img_s=f"{rate:.0f}"
  )
  return current


def _write_weights_records(
  trainer: Trainer,
  writer: MetricWriter,
  sums: training.StepOutput,
  counted: int,
  step: int,
  epoch: int,
) -> None:
  """The epoch's ``weights`` record (mean code change and update size per kernel over its
  ``counted`` batches, weight statistics) and the histograms of the latent weights."""
  code_change, update_ratio = jax.tree.map(
    lambda v: float(v) / counted, jax.device_get((sums.code_change, sums.update_ratio))
  )
  writer.write(
    "weights",
    {
      "step": step,
      "epoch": epoch,
      "batches": counted,
      **_prefixed("code_change", code_change),
      **_prefixed("update_ratio", update_ratio),
      **trainer.weight_statistics(),
    },
  )
  kernels = training.quantized_kernels(jax.device_get(trainer.state.params))
  writer.histograms(
    "latent_weights", {name: np.asarray(w) for name, (_, w) in kernels.items()}, step
  )


def _evaluate_and_check(
  trainer: Trainer,
  writer: MetricWriter,
  bar: Any,
  step: int,
  epoch: int,
  seconds: dict[str, float],
) -> None:
  """Evaluates on the test split, then (``bn_check_batches`` > 0) with re-estimated BatchNorm
  averages beside the stored ones; writes the ``eval`` record and the epoch's line."""
  config = trainer.config
  result = trainer.evaluate()
  record = {
    "step": step,
    "epoch": epoch,
    "accuracy": result["accuracy"],
    "loss": result["loss"],
    "accuracy_per_step": result["accuracy_per_step"],
    **seconds,
  }
  check = trainer.check_batch_stats()
  text = ""
  if check is not None:
    record.update(check)
    record["bn_gap"] = check["accuracy_reestimated"] - result["accuracy"]
    text = (
      f"; {100 * check['accuracy_reestimated']:.2f} % with BatchNorm averages "
      f"re-estimated from {config.bn_check_batches} batches"
    )
  writer.write("eval", record)
  per_step = ", ".join(f"{100 * a:.1f}" for a in result["accuracy_per_step"])
  bar.write(
    f"epoch {epoch + 1}/{config.epochs}: test accuracy {100 * result['accuracy']:.2f} % "
    f"(per step: {per_step}){text}"
  )


def _train_loop(
  trainer: Trainer, checkpoints: Checkpoints, writer: MetricWriter, start_step: int
) -> int | None:
  """Runs the remaining epochs; returns the signal number if one stopped it (after a checkpoint).

  Raises:
    _NonFinite: a step's loss or new state is not finite; nothing from that step on is saved.
  """
  config = trainer.config
  per_epoch = trainer.train_data.batches_per_epoch
  total = per_epoch * config.epochs
  step = start_step
  # (global step, finite flag, running sums) of each dispatched step; the flag is read once the
  # step has finished.
  inflight = dispatch.InFlight()

  def confirm_finite(finished):
    for checked, finite, _ in finished:
      if not bool(finite):
        raise _NonFinite(checked)

  def save():
    confirm_finite(inflight.drain())
    checkpoints.save(step, trainer.state, _meta(config, step, *divmod(step, per_epoch)))

  bar = writer.progress(total=total, initial=step, enabled=config.progress)
  with Interrupt() as interrupt:
    try:
      while step < total:
        epoch, position = divmod(step, per_epoch)
        tick, seen, in_window = time.perf_counter(), 0, 0
        # The step outputs (loss, accuracy, per-kernel code changes and relative update sizes)
        # summed on the device over the epoch (or since the resumption), one program per step;
        # a logging window's means are differences of these sums, read on the host.
        sums, logged, counted = None, None, 0
        epoch_start = time.perf_counter()
        for x, y in trainer.train_data.epoch(epoch, start=position):
          out, finite = trainer.train_batch(x, y, epoch)
          step += 1
          sums = dispatch.accumulate(sums, out)
          # Waits for the previous step only: this one stays queued behind it.
          confirm_finite(inflight.push((step, finite, sums)))
          seen += len(y) * trainer.process_count
          counted += 1
          in_window += 1
          if step % config.log_every_steps == 0 or step % per_epoch == 0:
            confirm_finite(inflight.drain())
            rate = seen / (time.perf_counter() - tick)
            logged = _log_window(trainer, writer, bar, sums, logged, in_window, rate, step, epoch)
            tick, seen, in_window = time.perf_counter(), 0, 0
          bar.update(1)
          if step % config.checkpoint_every_steps == 0:
            save()
          signum = interrupt.stop_signal(step)
          if signum is not None:
            save()
            bar.close()
            print(
              f"\nstopped by signal {signum} at step {step}; checkpoint saved, "
              "rerun with the same --workdir to resume",
              flush=True,
            )
            return signum
        # The epoch's end: weights records, BatchNorm re-estimation, checkpoint, evaluation.
        confirm_finite(inflight.drain())
        seconds = {"train_seconds": time.perf_counter() - epoch_start}
        if counted:
          _write_weights_records(trainer, writer, sums, counted, step, epoch)
        tick = time.perf_counter()
        trainer.recalibrate_batch_stats()
        seconds["recalibration_seconds"] = time.perf_counter() - tick
        save()
        if (epoch + 1) % config.eval_every_epochs == 0 or step == total:
          _evaluate_and_check(trainer, writer, bar, step, epoch, seconds)
    finally:
      bar.close()
  return None


def _window_means(current: Any, previous: Any | None, count: int) -> Any:
  """The mean of ``count`` steps' outputs from the running sums at the window's end
  (``current``) and at its start (``previous``; None at the start of a run or epoch), in float64
  on the host."""
  if previous is None:
    return jax.tree.map(lambda c: np.float64(c) / count, current)
  return jax.tree.map(lambda c, p: (np.float64(c) - np.float64(p)) / count, current, previous)


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, float]:
  """{``prefix/name``: float} of a {name: scalar} dict."""
  return {f"{prefix}/{name}": float(value) for name, value in values.items()}


def _locate_fault(
  trainer: Trainer, checkpoints: Checkpoints, abstract: Any, step: int
) -> NumericalError:
  """Restores the last good checkpoint before global step ``step``, replays the fused steps up to
  the failing batch and locates that batch's first non-finite value; returns the error to raise."""
  restored = checkpoints.restore_latest(abstract, before=step, delete_unreadable=True)
  if restored is None:
    good, trainer.state = None, trainer.initial_state()
  else:
    good, trainer.state, _ = restored
  per_epoch = trainer.train_data.batches_per_epoch
  for replayed in range((good or 0) + 1, step):
    _, finite = trainer.train_batch(*trainer.batch(replayed), (replayed - 1) // per_epoch)
    if not bool(finite):  # the same program on the same batches failed earlier: locate that
      return _locate_fault(trainer, checkpoints, abstract, replayed)
  epoch, position = divmod(step - 1, per_epoch)
  x, y = trainer.batch(step)
  x, y = trainer.global_batch(x, y.astype(np.int32))
  try:
    fault = diagnose.first_nonfinite(
      trainer.graphdef,
      trainer.optimizer,
      trainer.step_config,
      trainer.state,
      x,
      y,
      trainer.learning_rate(epoch),
      trainer.seed_key,
    )
    where = (
      fault.describe(trainer.config.time_steps)
      if fault is not None
      else "the step-by-step replay of this batch stays finite (it rounds differently from "
      "the fused step), so the time step and layer are unknown"
    )
  except Exception as error:
    # The global step and the kept checkpoint are known; a failed diagnosis must not hide them.
    fault, where = None, f"locating it failed ({type(error).__name__}: {error})"
  kept = (
    f"the last good checkpoint, step {good}, is kept in {checkpoints.directory}"
    if good is not None
    else "no checkpoint was written before it"
  )
  return NumericalError(
    f"non-finite value at global step {step} (epoch {epoch + 1}, batch {position + 1} of "
    f"{per_epoch}), {where}; {kept}; lower the learning rate or check the data",
    step=step,
    fault=fault,
    checkpoint=good,
  )


def exit_code(summary: dict) -> int:
  """128 + the signal number for a run stopped by a signal (143 for SIGTERM), else 0."""
  return 128 + summary["interrupted"] if "interrupted" in summary else 0
