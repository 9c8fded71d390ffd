"""The training driver: data-parallel online training with checkpoints, metrics and resumption.

``train_and_evaluate(config, workdir)`` trains per ``config`` and writes into ``workdir``:
``checkpoints/`` (Orbax), ``metrics.jsonl``, TensorBoard event files, ``config.json`` (with its
fingerprint) and ``summary.json``. Rerunning with the same workdir resumes from the newest
readable checkpoint, mid-epoch, with the same data order and random streams.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from empf_jax import accounting, models, training
from experiments import input as data_input
from experiments.checkpoint import Checkpoints
from experiments.metrics import MetricWriter

HARMLESS_KEYS = ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
                 "eval_every_epochs", "progress", "data_dir")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration value that is not allowed; the message names key, value and what is allowed."""


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of every config value that changes the result (harmless keys left out)."""
  values = config.to_dict()
  for key in HARMLESS_KEYS:
    values.pop(key, None)
  return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the training keys before any compute (the model's options are checked by
  :func:`empf_jax.models.validate`). Raises :class:`ConfigError`."""
  def fail(key, value, allowed):
    raise ConfigError(f"config.{key}={value!r} is not allowed; allowed: {allowed}")

  if config.mode not in training.MODES:
    fail("mode", config.mode, ", ".join(training.MODES))
  for key in ("time_steps", "batch_size", "epochs"):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      fail(key, value, "an integer >= 1")
  if not (isinstance(config.learning_rate, (int, float)) and config.learning_rate > 0):
    fail("learning_rate", config.learning_rate, "a number > 0")
  if config.compute_dtype not in DTYPES:
    fail("compute_dtype", config.compute_dtype, ", ".join(DTYPES))
  if config.model.spike_bits not in (0, 4):
    fail("model.spike_bits", config.model.spike_bits, "0 (floating-point spikes), 4")
  if config.checkpoint_every_steps < 1:
    fail("checkpoint_every_steps", config.checkpoint_every_steps, "an integer >= 1")
  devices = jax.device_count()
  if config.batch_size % devices:
    fail("batch_size", config.batch_size,
         f"a multiple of the device count {devices} (data-parallel over all devices)")


def build_model(config: ml_collections.ConfigDict, num_classes: int, in_channels: int
                ) -> models.SpikingNetwork:
  """The network of ``config.model`` (options checked by :func:`empf_jax.models.create`)."""
  m = config.model
  try:
    return models.create(
        m.name, num_classes=num_classes, time_steps=config.time_steps, in_channels=in_channels,
        stem=m.stem or None, neuron=m.neuron, weights=m.weights, mem_bn=m.mem_bn,
        parallel=m.parallel, spike_bits=m.spike_bits or None, seca=m.seca,
        learnable_lif=m.learnable_lif, width=m.width, rngs=nnx.Rngs(config.seed))
  except models.ConfigError as error:
    raise ConfigError(f"config.model: {error}") from None


class _Interrupt:
  """Turns SIGTERM/SIGINT into a flag the training loop checks after each batch."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _batch_parts(batch):
  """(x, y, mask) from an evaluation batch (x, y) whose padding examples have negative labels."""
  x, y = batch
  return x, np.maximum(y, 0), data_input.valid_mask(y).astype(np.float32)


class Trainer:
  """Holds the compiled steps, the mesh and the state of one run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    common = dict(seed=config.seed, data_dir=config.data_dir or None,
                  process_index=self.process_index, process_count=self.process_count)
    self.train_data = data_input.load(config.dataset, "train", batch_size=config.batch_size,
                                      train=True, augment=config.augment, **common)
    self.test_data = data_input.load(config.dataset, "test", batch_size=config.batch_size,
                                     train=False, augment=False, **common)
    shape = self.train_data.input_shape
    if self.train_data.time_major and shape[0] != config.time_steps:
      raise ConfigError(f"config.time_steps={config.time_steps} is not allowed for "
                        f"{config.dataset!r}; allowed: {shape[0]} (its examples have "
                        f"{shape[0]} time steps)")
    self.model = build_model(config, self.train_data.num_classes, shape[-1])
    self.step_config = training.StepConfig(
        mode=config.mode, time_steps=config.time_steps, num_classes=self.train_data.num_classes,
        static_input=not self.train_data.time_major, label_smoothing=config.label_smoothing,
        mix=config.mix, compute_dtype=DTYPES[config.compute_dtype])
    self.optimizer = training.make_optimizer(momentum=config.momentum,
                                             weight_decay=config.weight_decay,
                                             nesterov=config.nesterov,
                                             learning_rate=config.learning_rate)
    self.graphdef, state = training.create_train_state(self.model, self.optimizer)
    self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)
    self.seed_key = jax.random.key(config.seed)
    self._train_step = jax.jit(
        training.make_train_step(self.graphdef, self.optimizer, self.step_config),
        in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding, None, None),
        out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    self._eval_step = jax.jit(
        training.make_eval_step(self.graphdef, self.step_config),
        in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding,
                      self.batch_sharding),
        out_shardings=self.replicated)

  def learning_rate(self, epoch: int) -> float:
    c = self.config
    return float(training.epoch_learning_rate(epoch, base=c.learning_rate, epochs=c.epochs,
                                              warmup_epochs=c.warmup_epochs,
                                              warmup_start=c.warmup_start))

  def global_batch(self, *arrays: np.ndarray) -> list[jax.Array]:
    """Assembles each process's slice of the global batch into one sharded array."""
    return [jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(a))
            for a in arrays]

  def train_batch(self, x: np.ndarray, y: np.ndarray, epoch: int) -> training.StepOutput:
    x, y = self.global_batch(x, y.astype(np.int32))
    self.state, out = self._train_step(self.state, x, y, jnp.float32(self.learning_rate(epoch)),
                                       self.seed_key)
    return out

  def evaluate(self) -> dict[str, Any]:
    """Accuracy at every step, loss, firing rate per layer, learned decay/threshold."""
    totals = None
    for batch in self.test_data.epoch(0):
      x, y, mask = _batch_parts(batch)
      x, y, mask = self.global_batch(x, y.astype(np.int32), mask.astype(np.float32))
      out = self._eval_step(self.state, x, y, mask)
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals.count)
    accuracy = [float(c) / count for c in totals.correct]
    rates = {name: float(totals.spikes[name]) / float(totals.elements[name])
             for name in totals.spikes}
    model = training.merge(self.graphdef, jax.device_get(self.state))
    return {
        "accuracy_per_step": accuracy,
        "accuracy": accuracy[-1],
        "loss": float(totals.loss) / count,
        "examples": int(count),
        "firing_rate": rates,
        "neuron_scalars": training.learned_neuron_scalars(model),
    }

  def model_sizes(self) -> dict[str, float]:
    return {"params_mb_paper": accounting.param_megabytes(self.model),
            "params_mb_packed": accounting.packed_megabytes(self.model)}


def _meta(config, step, epoch, position) -> dict:
  return {"step": int(step), "epoch": int(epoch), "batch_in_epoch": int(position),
          "fingerprint": fingerprint(config)}


def check_workdir(config: ml_collections.ConfigDict, workdir: str, allow_other_config: bool):
  """Refuses a workdir that holds a run of a different config (fingerprint mismatch)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("fingerprint") != fingerprint(config) and not allow_other_config:
      raise ConfigError(
          f"workdir {workdir} holds a run of a different config (fingerprint "
          f"{saved.get('fingerprint')} != {fingerprint(config)}); use another --workdir, or pass "
          "--allow_config_change to continue this run with the new config")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"fingerprint": fingerprint(config), "config": config.to_dict()}, f, indent=2,
                default=str)
    os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, eval_only: bool = False,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has checkpoints), evaluates and returns the summary."""
  trainer = Trainer(config, workdir)
  if not eval_only:
    check_workdir(config, workdir, allow_config_change)
  checkpoints = Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"),
                            keep=config.keep_checkpoints)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          trainer.state)
  restored = checkpoints.restore_latest(abstract)
  start_step = 0
  if restored is not None:
    start_step, trainer.state, meta = restored
    print(f"resuming from step {start_step} (epoch {meta['epoch']}, batch "
          f"{meta['batch_in_epoch']})", flush=True)
  elif eval_only:
    raise ConfigError(f"--eval_only: no checkpoint in {workdir}/checkpoints")
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    if not eval_only:
      interrupted = _train_loop(trainer, checkpoints, writer, start_step)
      if interrupted:
        return {"interrupted": True}
    summary = trainer.evaluate()
    summary.update(trainer.model_sizes())
    summary["step"] = int(trainer.state.step)
    writer.write_summary(summary)
    return summary
  finally:
    writer.close()
    checkpoints.close()


def _train_loop(trainer: Trainer, checkpoints: Checkpoints, writer: MetricWriter,
                start_step: int) -> bool:
  """Runs the remaining epochs; returns True if interrupted by a signal (after checkpointing)."""
  config = trainer.config
  per_epoch = trainer.train_data.batches_per_epoch
  total = per_epoch * config.epochs
  step = start_step
  bar = writer.progress(total=total, initial=step, enabled=config.progress)
  with _Interrupt() as interrupt:
    while step < total:
      epoch, position = divmod(step, per_epoch)
      tick, seen, window = time.perf_counter(), 0, []
      for x, y in trainer.train_data.epoch(epoch, start=position):
        out = trainer.train_batch(x, y, epoch)
        step += 1
        seen += len(y) * trainer.process_count
        window.append(out)
        if step % config.log_every_steps == 0 or step % per_epoch == 0:
          means = jax.device_get(jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *window))
          rate = seen / (time.perf_counter() - tick)
          record = {"step": step, "epoch": epoch, "loss": float(means.loss),
                    "train_accuracy": float(means.accuracy), "images_per_second": rate,
                    "learning_rate": trainer.learning_rate(epoch)}
          if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"non-finite training loss {record['loss']} at step {step} (epoch {epoch}); "
                f"the last good checkpoint is kept in {checkpoints.manager.directory}")
          writer.write("train", record)
          bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}",
                          img_s=f"{rate:.0f}")
          tick, seen, window = time.perf_counter(), 0, []
        bar.update(1)
        if step % config.checkpoint_every_steps == 0:
          checkpoints.save(step, trainer.state, _meta(config, step, *divmod(step, per_epoch)))
        if interrupt.signal is not None:
          checkpoints.save(step, trainer.state, _meta(config, step, *divmod(step, per_epoch)))
          bar.close()
          print(f"\nstopped by signal {interrupt.signal} at step {step}; checkpoint saved, "
                "rerun with the same --workdir to resume", flush=True)
          return True
      checkpoints.save(step, trainer.state, _meta(config, step, *divmod(step, per_epoch)))
      if (epoch + 1) % config.eval_every_epochs == 0 or step == total:
        result = trainer.evaluate()
        writer.write("eval", {"step": step, "epoch": epoch, "accuracy": result["accuracy"],
                              "loss": result["loss"],
                              "accuracy_per_step": result["accuracy_per_step"]})
        bar.write(f"epoch {epoch + 1}/{config.epochs}: test accuracy "
                  f"{100 * result['accuracy']:.2f} % (per step: "
                  + ", ".join(f"{100 * a:.1f}" for a in result["accuracy_per_step"]) + ")")
  bar.close()
  return False


def exit_code(summary: dict) -> int:
  """143 (128 + SIGTERM) for an interrupted run, else 0."""
  return 128 + signal.SIGTERM if summary.get("interrupted") else 0
