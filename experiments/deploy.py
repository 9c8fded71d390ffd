"""Export a trained run as a deployment bundle, and evaluate a bundle on its test set.

    python -m experiments.deploy --workdir=DIR --out=FILE [--report_dir=DIR] [--report_batches=N]
    python -m experiments.deploy --bundle=FILE --evaluate [--dataset=NAME] [--data_dir=DIR]
        [--batch_size=N] [--report_dir=DIR]

Export reads ``DIR/config.json``, rebuilds the network, restores the newest readable checkpoint of
``DIR/checkpoints``, folds it (:func:`empf_jax.deploy.deploy`: BatchNorm and Mem-BN folded, binary
weights packed as sign bits) and writes the bytes of :func:`empf_jax.bundle.to_bytes` to FILE,
atomically. Next to it go ``FILE.json`` (the dataset the network was trained on, the checkpoint
step and the config fingerprint: the bundle itself stores only the architecture) and the efficiency
report of :func:`experiments.report.write_efficiency_report` (``efficiency.md``, ``.json``,
``.png``), measured on the first test batches with the trained network: the deployed network
computes the same spikes, so its firing rates and operation counts are the same.

Evaluate runs the bundle alone (:func:`empf_jax.deploy.run`, no training code) on the test split
of its dataset (``--dataset``, else the one named in ``FILE.json``) and reports the accuracy at
every time step t, predicting argmax_k sum_{tau <= t} f_tau(x)_k as the training evaluation does;
the figures go to stdout and ``evaluation.json`` in the report folder.

Errors are one line on stderr starting with ``error:``; the exit code is 2 for a missing workdir,
config or checkpoint, an unreadable or corrupted bundle (the :class:`empf_jax.bundle.BundleError`
message), an unknown dataset or one that does not fit the bundle, and bad flags.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from empf_jax import accounting, bundle, deploy, models, training
from experiments import input as data_input
from experiments import report, train
from experiments.checkpoint import CheckpointError, Checkpoints

EXIT_USAGE = 2
SIDECAR_SUFFIX = ".json"
EVALUATION = "evaluation.json"
DEFAULT_EVAL_BATCH = 100

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export (with --out).")
_OUT = flags.DEFINE_string("out", None, "Bundle file to write (with --workdir).")
_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle file to evaluate (with --evaluate).")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Evaluate --bundle on the test set.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Dataset to evaluate on; default: the one in the bundle's FILE.json.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Data folder; default: the one in FILE.json, else the dataset's default.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", DEFAULT_EVAL_BATCH,
                                   "Evaluation batch size.", lower_bound=1)
_REPORT_DIR = flags.DEFINE_string(
    "report_dir", None, "Folder for the efficiency report (export) or evaluation.json "
    "(evaluate); default: the bundle's folder.")
_REPORT_BATCHES = flags.DEFINE_integer(
    "report_batches", 4, "Test batches the efficiency report measures.", lower_bound=1)


class UsageError(Exception):
  """Something the user can fix: the message is printed as one ``error:`` line, exit code 2."""


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def _atomic_write(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename: never half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, str | None]:
  """The config of a training workdir, from ``workdir/config.json`` ({fingerprint, config})."""
  if not os.path.isdir(workdir):
    raise UsageError(f"workdir {workdir} does not exist")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UsageError(f"{path} is missing: {workdir} is not a training workdir of "
                     "experiments.cifar")
  try:
    with open(path) as f:
      saved = json.load(f)
    return train.with_added_keys(saved["config"]), saved.get("fingerprint")
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UsageError(f"cannot read {path}: {error}") from None


def restore_model(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                  step_shape: tuple[int, ...]) -> tuple[models.SpikingNetwork, int]:
  """The network of ``config`` with the newest readable checkpoint of ``workdir``: (model, step)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise UsageError(f"no checkpoint in {workdir}: {directory} does not exist")
  try:
    model = train.build_model(config, num_classes, step_shape)
  except (train.ConfigError, AttributeError, KeyError) as error:  # a bad value or a missing key
    raise UsageError(f"{workdir}/config.json: {error}") from None
  optimizer = training.make_optimizer(momentum=config.momentum, weight_decay=config.weight_decay,
                                      nesterov=config.nesterov,
                                      learning_rate=config.learning_rate)
  graphdef, state = training.create_train_state(model, optimizer)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          state)
  checkpoints = Checkpoints(directory, keep=config.keep_checkpoints)
  try:
    restored = checkpoints.restore_latest(abstract)
  except CheckpointError as error:
    raise UsageError(str(error)) from None
  finally:
    checkpoints.close()
  if restored is None:
    raise UsageError(f"no checkpoint in {directory}")
  step, state, _ = restored
  return training.merge(graphdef, state), step


def _test_split(dataset: str, *, batch_size: int, data_dir: str | None) -> data_input.Batches:
  try:
    return data_input.load(dataset, "test", batch_size=batch_size, train=False, seed=0,
                           data_dir=data_dir, augment=False)
  except data_input.DataError as error:
    raise UsageError(str(error)) from None


def export(workdir: str, out: str, *, report_dir: str | None, report_batches: int
           ) -> dict[str, Any]:
  """Exports the newest checkpoint of ``workdir`` to the bundle file ``out``; returns what the
  sidecar ``out.json`` holds."""
  config, fingerprint = read_run_config(workdir)
  data_dir = config.get("data_dir") or None
  test = _test_split(config.dataset, batch_size=config.batch_size, data_dir=data_dir)
  shape = train.step_shape(test)
  model, step = restore_model(workdir, config, test.num_classes, shape)
  try:
    deployed = deploy.deploy(model, config.model.name,
                             **train.model_options(config, test.num_classes, shape))
  except (deploy.DeployError, models.ConfigError) as error:
    raise UsageError(f"{workdir}: cannot deploy this network: {error}") from None
  data = bundle.to_bytes(deployed)
  _atomic_write(out, data)
  sidecar = {"dataset": config.dataset, "data_dir": data_dir, "workdir": os.path.abspath(workdir),
             "step": int(step), "fingerprint": fingerprint, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
  _atomic_write(out + SIDECAR_SUFFIX, (json.dumps(sidecar, indent=2) + "\n").encode())
  print(f"exported {config.model.name} ({config.dataset}, checkpoint step {step}) to {out}: "
        f"{len(data)} bytes ({len(data) / 1e6:.4f} MB)")
  print(f"weights: {accounting.param_megabytes(model):.4f} MB by the paper's rule, "
        f"{accounting.packed_megabytes(model):.4f} MB packed")
  folder = report_dir or os.path.dirname(os.path.abspath(out))
  result = report.write_efficiency_report(model, test.epoch(0), folder,
                                          max_batches=report_batches)
  totals = result["totals"]
  print(f"efficiency ({result['samples']} test examples): {totals['sops'] / 1e6:.4g} M SOPs, "
        f"firing rate {totals['firing_rate']:.4f}, energy {totals['energy_authors_pj'] / 1e6:.4g}"
        f" uJ (authors) / {totals['energy_full_pj'] / 1e6:.4g} uJ (full) per example; report in "
        f"{os.path.join(folder, report.MARKDOWN)}")
  return sidecar


def read_bundle(path: str) -> tuple[deploy.Deployed, dict[str, Any]]:
  """The deployed network stored in ``path`` and its sidecar (an empty dict if there is none)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as error:
    raise UsageError(f"cannot read the bundle {path}: {error.strerror}") from None
  try:
    deployed = bundle.from_bytes(data)
  except bundle.BundleError as error:
    raise UsageError(f"{path} is not a valid bundle: {error}") from None
  sidecar = {}
  if os.path.exists(path + SIDECAR_SUFFIX):
    try:
      with open(path + SIDECAR_SUFFIX) as f:
        sidecar = json.load(f)
    except (OSError, ValueError) as error:
      raise UsageError(f"cannot read {path + SIDECAR_SUFFIX}: {error}") from None
  return deployed, sidecar


def check_fits(arch: deploy.Architecture, test: data_input.Batches, dataset: str) -> None:
  """Raises :class:`UsageError` unless the test split has the bundle's classes, channels, steps."""
  wanted = {"num_classes": test.num_classes, "in_channels": test.input_shape[-1]}
  if test.time_major:
    wanted["time_steps"] = test.input_shape[0]
  if arch.option("in_features") is not None:
    wanted["in_features"] = math.prod(train.step_shape(test))
  for key, value in wanted.items():
    if arch.option(key) != value:
      raise UsageError(f"dataset {dataset!r} has {key}={value}, the bundle's network "
                       f"{arch.name} has {key}={arch.option(key)}")


def evaluate_bundle(deployed: deploy.Deployed, test: data_input.Batches) -> dict[str, Any]:
  """Accuracy of a deployed network at every time step on an evaluation pipeline.

  Prediction at step t: argmax_k sum_{tau <= t} f_tau(x)_k; padding examples (label -1) are left
  out.
  """
  steps = deployed.arch.time_steps
  correct, count = np.zeros(steps, np.int64), 0
  for x, y in test.epoch(0):
    x_seq = training.time_major(x, steps, static=not test.time_major)
    logits = np.asarray(deploy.run(deployed, x_seq))
    predictions = np.argmax(np.cumsum(logits, axis=0), axis=-1)
    keep = data_input.valid_mask(y)
    correct += np.sum((predictions == y[None]) & keep[None], axis=1)
    count += int(keep.sum())
  accuracy = [float(c) / count for c in correct]
  return {"accuracy": accuracy[-1], "accuracy_per_step": accuracy, "examples": count}


def evaluate(path: str, *, dataset: str | None, data_dir: str | None, batch_size: int,
             report_dir: str | None) -> dict[str, Any]:
  """Evaluates the bundle file ``path`` on the test split; returns what evaluation.json holds."""
  deployed, sidecar = read_bundle(path)
  dataset = dataset or sidecar.get("dataset")
  if not dataset:
    raise UsageError(f"the bundle does not name its dataset and {path + SIDECAR_SUFFIX} is "
                     f"missing: pass --dataset (one of {', '.join(sorted(data_input.LOADERS))})")
  if data_dir is None:
    data_dir = sidecar.get("data_dir") if sidecar.get("dataset") == dataset else None
  test = _test_split(dataset, batch_size=batch_size, data_dir=data_dir)
  check_fits(deployed.arch, test, dataset)
  start = time.perf_counter()
  result = evaluate_bundle(deployed, test)
  result.update({"bundle": os.path.abspath(path), "dataset": dataset,
                 "bundle_bytes": os.path.getsize(path),
                 "seconds": round(time.perf_counter() - start, 3)})
  folder = report_dir or os.path.dirname(os.path.abspath(path))
  _atomic_write(os.path.join(folder, EVALUATION), (json.dumps(result, indent=2) + "\n").encode())
  print(f"{deployed.arch.name} from {path} on {dataset} ({result['examples']} test examples): "
        f"accuracy at t = T: {100 * result['accuracy']:.2f} %")
  print("accuracy at each step: " + ", ".join(
      f"t={t + 1}: {100 * a:.2f} %" for t, a in enumerate(result["accuracy_per_step"])))
  return result


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag error as one ``error:`` line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(" ".join(str(error).split()))
  return []


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  exporting = _WORKDIR.value is not None or _OUT.value is not None
  evaluating = _EVALUATE.value or _BUNDLE.value is not None
  if exporting == evaluating:
    _fail("give either --workdir=DIR --out=FILE (export) or --bundle=FILE --evaluate "
          "(evaluate)")
  try:
    if exporting:
      if _WORKDIR.value is None or _OUT.value is None:
        raise UsageError("export needs both --workdir=DIR and --out=FILE")
      export(_WORKDIR.value, _OUT.value, report_dir=_REPORT_DIR.value,
             report_batches=_REPORT_BATCHES.value)
    else:
      if _BUNDLE.value is None or not _EVALUATE.value:
        raise UsageError("evaluation needs both --bundle=FILE and --evaluate")
      evaluate(_BUNDLE.value, dataset=_DATASET.value, data_dir=_DATA_DIR.value,
               batch_size=_BATCH_SIZE.value, report_dir=_REPORT_DIR.value)
  except UsageError as error:
    _fail(str(error))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
