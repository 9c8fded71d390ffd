"""Export a trained run as a deployment bundle, and evaluate a bundle on its test set.

    python -m experiments.deploy --workdir=DIR --out=FILE [--report_dir=DIR] [--report_batches=N]
    python -m experiments.deploy --bundle=FILE --evaluate [--dataset=NAME] [--data_dir=DIR]
        [--batch_size=N] [--report_dir=DIR] [--exit=RULE:THRESHOLD] [--exit_sweep]
    python -m experiments.deploy --bundle=FILE --onnx=OUT.onnx [--input_shape=H,W,C]
        [--exit=RULE:THRESHOLD]

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
every time step t, predicting argmax_k sum_{tau <= t} f_tau(x)_k as the training evaluation does,
and the operations and energy per example of the deployed runner over all T steps
(:func:`empf_jax.efficiency.step_operations`); the figures go to stdout and ``evaluation.json`` in
the report folder.

Early exit: ``--exit=softmax:0.9`` or ``--exit=margin:2`` runs every example until the rule fires
(:func:`empf_jax.deploy.run_early_exit`, T the ceiling) and reports its accuracy, mean steps,
the fraction of examples stopping at each step and the operations and energy counted over the
steps each example ran. ``--exit_sweep`` evaluates the rules of :data:`SWEEP` from one run of all
T steps (an example's exit step, prediction and counts up to that step are those the runner would
stop with: later steps change none of them) and writes ``exit_sweep.md``, ``.json`` and ``.png``
(:func:`experiments.report.write_exit_report`): accuracy against mean steps and against energy,
with the all-steps point.

ONNX: ``--onnx=OUT.onnx`` writes the bundle's network as an ONNX graph
(:func:`empf_jax.deploy.export.to_onnx`: input [T, B, H, W, C], outputs the cumulative output
c_t at every step and the prediction), for one example's step input of ``--input_shape`` (default:
that of the dataset in ``FILE.json``); with ``--exit``, the early-exit graph (outputs the
prediction, the steps each example ran and c_t at its exit step). The command then runs the file
in onnxruntime on random input and checks its outputs against :func:`empf_jax.deploy.run` or
:func:`empf_jax.deploy.run_early_exit` (rtol 1e-4, atol 1e-5; the same exit steps).

Errors are one line on stderr starting with ``error:``; the exit code is 2 for a missing workdir,
config or checkpoint, an unreadable or corrupted bundle (the :class:`empf_jax.bundle.BundleError`
message), an unknown dataset or one that does not fit the bundle, and bad flags (an ``--exit``
value names what is allowed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from empf_jax import accounting, bundle, deploy, efficiency, models, training, xla_defaults
from experiments import input as data_input
from experiments import report, train
from experiments.checkpoint import CheckpointError, Checkpoints
from experiments.cli import fail, one_line
from experiments.files import atomic_write

SIDECAR_SUFFIX = ".json"
EVALUATION = "evaluation.json"
DEFAULT_EVAL_BATCH = 100
# Exit rules of --exit_sweep: softmax confidences from 0.3 to near certainty (training's label
# smoothing of 0.1 puts a well-trained network's confidence near 0.9, so few examples pass 0.95),
# and margins of the mean logits from a quarter of a unit to eight.
SWEEP = tuple(
  deploy.ExitRule("softmax", p) for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
) + tuple(deploy.ExitRule("margin", m) for m in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8))

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export (with --out).")
_OUT = flags.DEFINE_string("out", None, "Bundle file to write (with --workdir).")
_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle file to evaluate (with --evaluate).")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Evaluate --bundle on the test set.")
_DATASET = flags.DEFINE_string(
  "dataset", None, "Dataset to evaluate on; default: the one in the bundle's FILE.json."
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "Data folder; default: the one in FILE.json, else the dataset's default."
)
_BATCH_SIZE = flags.DEFINE_integer(
  "batch_size", DEFAULT_EVAL_BATCH, "Evaluation batch size.", lower_bound=1
)
_REPORT_DIR = flags.DEFINE_string(
  "report_dir",
  None,
  "Folder for the efficiency report (export) or evaluation.json "
  "(evaluate); default: the bundle's folder.",
)
_EXIT = flags.DEFINE_string(
  "exit",
  None,
  "Early exit with --evaluate (or the early-exit graph with --onnx): softmax:P (stop once "
  "the top softmax probability of the mean output reaches P, 0 < P <= 1) or margin:M "
  "(top-1 minus top-2 of the mean output >= M >= 0).",
)
_EXIT_SWEEP = flags.DEFINE_bool(
  "exit_sweep",
  False,
  "With --evaluate: accuracy, steps and energy of the exit rules of "
  "SWEEP, written as exit_sweep.md/.json/.png into the report folder.",
)
_ONNX = flags.DEFINE_string("onnx", None, "ONNX file to write from --bundle.")
_INPUT_SHAPE = flags.DEFINE_list(
  "input_shape",
  None,
  "With --onnx: one example's input at one step, H,W,C (or F); default: "
  "the shape of the dataset named in the bundle's FILE.json.",
)
_REPORT_BATCHES = flags.DEFINE_integer(
  "report_batches", 4, "Test batches the efficiency report measures.", lower_bound=1
)


class UsageError(Exception):
  """Something the user can fix: the message is printed as one ``error:`` line, exit code 2."""


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, str | None]:
  """The config of a training workdir, from ``workdir/config.json`` ({fingerprint, config})."""
  if not os.path.isdir(workdir):
    raise UsageError(f"workdir {workdir} does not exist")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UsageError(f"{path} is missing: {workdir} is not a training workdir of experiments.cifar")
  try:
    with open(path) as f:
      saved = json.load(f)
    return train.with_added_keys(saved["config"]), saved.get("fingerprint")
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise UsageError(f"cannot read {path}: {error}") from None


def restore_model(
  workdir: str, config: ml_collections.ConfigDict, num_classes: int, step_shape: tuple[int, ...]
) -> tuple[models.SpikingNetwork, int]:
  """The network of ``config`` with the newest readable checkpoint of ``workdir``: (model, step)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise UsageError(f"no checkpoint in {workdir}: {directory} does not exist")
  try:
    model = train.build_model(config, num_classes, step_shape)
  except (train.ConfigError, AttributeError, KeyError) as error:  # a bad value or a missing key
    raise UsageError(f"{workdir}/config.json: {error}") from None
  graphdef, state = training.create_train_state(model, train.build_optimizer(config))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
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
    return data_input.load(
      dataset, "test", batch_size=batch_size, train=False, seed=0, data_dir=data_dir, augment=False
    )
  except data_input.DataError as error:
    raise UsageError(str(error)) from None


def export(
  workdir: str, out: str, *, report_dir: str | None, report_batches: int
) -> dict[str, Any]:
  """Exports the newest checkpoint of ``workdir`` to the bundle file ``out``; returns what the
  sidecar ``out.json`` holds."""
  config, fingerprint = read_run_config(workdir)
  data_dir = config.get("data_dir") or None
  test = _test_split(config.dataset, batch_size=config.batch_size, data_dir=data_dir)
  shape = train.step_shape(test)
  model, step = restore_model(workdir, config, test.num_classes, shape)
  try:
    deployed = deploy.deploy(model)
  except (deploy.DeployError, models.ConfigError) as error:
    raise UsageError(f"{workdir}: cannot deploy this network: {error}") from None
  data = bundle.to_bytes(deployed)
  atomic_write(out, data)
  sidecar = {
    "dataset": config.dataset,
    "data_dir": data_dir,
    "workdir": os.path.abspath(workdir),
    "step": int(step),
    "fingerprint": fingerprint,
    "bytes": len(data),
    "sha256": hashlib.sha256(data).hexdigest(),
  }
  atomic_write(out + SIDECAR_SUFFIX, (json.dumps(sidecar, indent=2) + "\n").encode())
  print(
    f"exported {config.model.name} ({config.dataset}, checkpoint step {step}) to {out}: "
    f"{len(data)} bytes ({len(data) / 1e6:.4f} MB)"
  )
  print(
    f"weights: {accounting.param_megabytes(model):.4f} MB by the paper's rule, "
    f"{accounting.packed_megabytes(model):.4f} MB packed"
  )
  folder = report_dir or os.path.dirname(os.path.abspath(out))
  result = report.write_efficiency_report(model, test.epoch(0), folder, max_batches=report_batches)
  totals = result["totals"]
  print(
    f"efficiency ({result['samples']} test examples): {totals['sops'] / 1e6:.4g} M SOPs, "
    f"firing rate {totals['firing_rate']:.4f}, energy {totals['energy_authors_pj'] / 1e6:.4g}"
    f" uJ (authors) / {totals['energy_full_pj'] / 1e6:.4g} uJ (full) per example; report in "
    f"{os.path.join(folder, report.MARKDOWN)}"
  )
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
  if arch.options.in_features is not None:
    wanted["in_features"] = math.prod(train.step_shape(test))
  for key, value in wanted.items():
    if getattr(arch.options, key) != value:
      raise UsageError(
        f"dataset {dataset!r} has {key}={value}, the bundle's network "
        f"{arch.name} has {key}={getattr(arch.options, key)}"
      )


class _ExitTally:
  """Accumulates, over evaluation batches, what examples stopping at chosen steps achieve."""

  def __init__(self, rule: deploy.ExitRule | None, time_steps: int):
    self.rule = rule
    self.correct = self.count = 0
    self.stopped = np.zeros(time_steps, np.int64)  # examples stopping at t = 1..T
    self.operations: dict[str, float] = {}

  def add(self, predictions: Any, steps: Any, operations: dict[str, Any], y: np.ndarray) -> None:
    """One batch: per example its prediction, steps run and operations over those steps."""
    keep = data_input.valid_mask(y)
    self.correct += int(np.sum((np.asarray(predictions) == y) & keep))
    self.count += int(keep.sum())
    self.stopped += np.bincount(np.asarray(steps)[keep] - 1, minlength=len(self.stopped))
    for key, value in operations.items():
      self.operations[key] = self.operations.get(key, 0.0) + float(np.sum(np.asarray(value)[keep]))

  def result(self) -> dict[str, Any]:
    """Accuracy, mean steps, the fraction stopping at each step, and per-example operations."""
    steps = np.arange(1, len(self.stopped) + 1)
    return {
      "rule": None if self.rule is None else self.rule.kind,
      "threshold": None if self.rule is None else self.rule.threshold,
      "accuracy": self.correct / self.count,
      "mean_steps": float(self.stopped @ steps) / self.count,
      "stopped_per_step": [float(n) / self.count for n in self.stopped],
      **{key: value / self.count for key, value in self.operations.items()},
    }


def _up_to(per_step: dict[str, np.ndarray], steps: np.ndarray) -> dict[str, np.ndarray]:
  """Per example, the sum of per-step values [S, B] over its first ``steps`` steps."""
  return {
    key: np.take_along_axis(np.cumsum(value, axis=0), steps[None] - 1, axis=0)[0]
    for key, value in per_step.items()
  }


def evaluate_bundle(
  deployed: deploy.Deployed,
  test: data_input.Batches,
  *,
  exit_rule: deploy.ExitRule | None = None,
  sweep: tuple[deploy.ExitRule, ...] = (),
) -> dict[str, Any]:
  """Accuracy and counted operations of a deployed network on an evaluation pipeline.

  Prediction at step t: argmax_k sum_{tau <= t} f_tau(x)_k; padding examples (label -1) are left
  out. Operations and energies are per example, from :func:`empf_jax.efficiency.step_operations`.

  Args:
    deployed: the deployed network.
    test: the evaluation pipeline.
    exit_rule: also run :func:`empf_jax.deploy.run_early_exit` with this rule (key
      ``early_exit``).
    sweep: rules evaluated from the all-steps run with :func:`empf_jax.deploy.exit_steps` (key
      ``exit_sweep``, the all-steps point first).
  """
  steps = deployed.arch.time_steps
  correct = np.zeros(steps, np.int64)
  tallies = [_ExitTally(rule, steps) for rule in (None, *sweep)]
  early = None if exit_rule is None else _ExitTally(exit_rule, steps)
  for x, y in test.epoch(0):
    x_seq = training.time_major(x, steps, static=not test.time_major)
    logits, per_step = jax.device_get(deploy.run(deployed, x_seq, probe=efficiency.step_operations))
    keep = data_input.valid_mask(y)
    predictions = np.argmax(np.cumsum(logits, axis=0), axis=-1)
    correct += np.sum((predictions == y[None]) & keep[None], axis=1)
    for tally in tallies:
      stop, predicted = jax.device_get(deploy.exit_steps(logits, tally.rule))
      tally.add(predicted, stop, _up_to(per_step, stop), y)
    if early is not None:
      result = jax.device_get(
        deploy.run_early_exit(deployed, x_seq, exit_rule, probe=efficiency.step_operations)
      )
      early.add(result.predictions, result.steps, result.totals, y)
  count = tallies[0].count
  accuracy = [float(c) / count for c in correct]
  out = {
    "accuracy": accuracy[-1],
    "accuracy_per_step": accuracy,
    "examples": count,
    "operations": {key: value / count for key, value in tallies[0].operations.items()},
  }
  if early is not None:
    out["early_exit"] = early.result()
  if sweep:
    out["exit_sweep"] = [tally.result() for tally in tallies]
  return out


def _exit_line(result: dict[str, Any]) -> str:
  stopped = ", ".join(f"{100 * f:.1f}" for f in result["stopped_per_step"])
  return (
    f"accuracy {100 * result['accuracy']:.2f} %, mean steps {result['mean_steps']:.3f} "
    f"(% stopping at t = 1..T: {stopped}), energy per example "
    f"{result['energy_authors_pj'] / 1e6:.4g} uJ (authors) / "
    f"{result['energy_full_pj'] / 1e6:.4g} uJ (full)"
  )


def parse_exit(text: str | None) -> deploy.ExitRule | None:
  """The rule of ``--exit`` (None when not given); a bad value is a :class:`UsageError`."""
  if text is None:
    return None
  try:
    return deploy.ExitRule.parse(text)
  except ValueError as error:
    raise UsageError(f"--exit={text}: {error}") from None


def evaluate(
  path: str,
  *,
  dataset: str | None,
  data_dir: str | None,
  batch_size: int,
  report_dir: str | None,
  exit_rule: deploy.ExitRule | None = None,
  exit_sweep: bool = False,
) -> dict[str, Any]:
  """Evaluates the bundle file ``path`` on the test split; returns what evaluation.json holds
  (with ``exit_rule`` and ``exit_sweep`` as in :func:`evaluate_bundle`, the sweep with
  :data:`SWEEP`, its report written next to evaluation.json)."""
  deployed, sidecar = read_bundle(path)
  dataset = dataset or sidecar.get("dataset")
  if not dataset:
    raise UsageError(
      f"the bundle does not name its dataset and {path + SIDECAR_SUFFIX} is "
      f"missing: pass --dataset (one of {', '.join(sorted(data_input.LOADERS))})"
    )
  if data_dir is None:
    data_dir = sidecar.get("data_dir") if sidecar.get("dataset") == dataset else None
  test = _test_split(dataset, batch_size=batch_size, data_dir=data_dir)
  check_fits(deployed.arch, test, dataset)
  start = time.perf_counter()
  result = evaluate_bundle(deployed, test, exit_rule=exit_rule, sweep=SWEEP if exit_sweep else ())
  result.update(
    {
      "bundle": os.path.abspath(path),
      "dataset": dataset,
      "bundle_bytes": os.path.getsize(path),
      "seconds": round(time.perf_counter() - start, 3),
    }
  )
  folder = report_dir or os.path.dirname(os.path.abspath(path))
  atomic_write(os.path.join(folder, EVALUATION), (json.dumps(result, indent=2) + "\n").encode())
  print(
    f"{deployed.arch.name} from {path} on {dataset} ({result['examples']} test examples): "
    f"accuracy at t = T: {100 * result['accuracy']:.2f} %"
  )
  print(
    "accuracy at each step: "
    + ", ".join(f"t={t + 1}: {100 * a:.2f} %" for t, a in enumerate(result["accuracy_per_step"]))
  )
  operations = result["operations"]
  print(
    f"all T steps: energy per example {operations['energy_authors_pj'] / 1e6:.4g} uJ "
    f"(authors) / {operations['energy_full_pj'] / 1e6:.4g} uJ (full)"
  )
  if exit_rule is not None:
    print(f"early exit {exit_rule}: " + _exit_line(result["early_exit"]))
  if exit_sweep:
    report.write_exit_report(
      result["exit_sweep"], folder, title=f"{deployed.arch.name} on {dataset}"
    )
    print(f"exit sweep ({len(SWEEP)} rules) in {os.path.join(folder, report.EXIT_MARKDOWN)}")
  return result


def _input_shape(sidecar: dict[str, Any], path: str) -> tuple[int, ...]:
  """--input_shape, else the step shape of the dataset the bundle's sidecar names."""
  if _INPUT_SHAPE.value is not None:
    text = ",".join(_INPUT_SHAPE.value)
    try:
      shape = tuple(int(v) for v in _INPUT_SHAPE.value)
    except ValueError:
      shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
      raise UsageError(f"--input_shape={text} is not H,W,C or F (positive integers)")
    return shape
  dataset = sidecar.get("dataset")
  if not dataset:
    raise UsageError(f"{path + SIDECAR_SUFFIX} does not name the dataset: pass --input_shape=H,W,C")
  test = _test_split(dataset, batch_size=1, data_dir=sidecar.get("data_dir"))
  return train.step_shape(test)


def export_onnx(path: str, out: str, exit_rule: deploy.ExitRule | None = None) -> dict[str, Any]:
  """Writes the network of the bundle file ``path`` as the ONNX file ``out`` (with ``exit_rule``,
  the early-exit graph) and checks it in onnxruntime against :func:`empf_jax.deploy.run` (or
  :func:`empf_jax.deploy.run_early_exit`); returns what it printed, as a dict."""
  from empf_jax.deploy import export as onnx_export

  deployed, sidecar = read_bundle(path)
  shape = _input_shape(sidecar, path)
  try:
    proto = onnx_export.to_onnx(deployed, shape, exit_rule)
  except ImportError as error:
    raise UsageError(str(error)) from None
  except ValueError as error:  # a shape the network cannot take
    raise UsageError(f"--input_shape={','.join(map(str, shape))}: {one_line(str(error))}") from None
  data = proto.SerializeToString()
  atomic_write(out, data)
  steps = deployed.arch.time_steps
  x = np.random.default_rng(0).normal(size=(steps, 8, *shape)).astype(np.float32)
  import onnxruntime

  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  got = session.run(["cumulative"], {"x": x})[0]
  if exit_rule is None:
    expected = np.cumsum(np.asarray(deploy.run(deployed, x)), axis=0)
    same_steps = True
  else:
    early = deploy.run_early_exit(deployed, x, exit_rule)
    expected = np.asarray(early.cumulative)
    same_steps = np.array_equal(session.run(["steps"], {"x": x})[0], np.asarray(early.steps))
  difference = float(np.max(np.abs(got - expected)))
  if not (same_steps and np.allclose(got, expected, rtol=1e-4, atol=1e-5)):
    raise UsageError(
      f"{out}: onnxruntime's outputs differ from deploy.run's by up to "
      f"{difference:.3g} on random input (allowed: rtol 1e-4, atol 1e-5); the file "
      "is written, but do not use it"
    )
  result = {
    "onnx": os.path.abspath(out),
    "bytes": len(data),
    "bundle_bytes": os.path.getsize(path),
    "opset": onnx_export.OPSET,
    "input": [steps, "batch", *shape],
    "max_abs_difference": difference,
  }
  what = "" if exit_rule is None else f" with early exit {exit_rule}"
  print(
    f"wrote {out}: {deployed.arch.name}{what}, input [T={steps}, batch, "
    f"{', '.join(map(str, shape))}], opset {onnx_export.OPSET}, {len(data)} bytes "
    f"({len(data) / result['bundle_bytes']:.1f}x the bundle's {result['bundle_bytes']})"
  )
  runtime = "deploy.run" if exit_rule is None else "deploy.run_early_exit (exit steps too)"
  print(f"onnxruntime equals {runtime} on random input (largest difference {difference:.2g})")
  return result


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag error as one ``error:`` line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(" ".join(str(error).split()))
  return []


def main(argv: list[str]) -> int:
  xla_defaults.apply_cpu_defaults()  # before JAX starts its backend
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  exporting = _WORKDIR.value is not None or _OUT.value is not None
  evaluating = _EVALUATE.value or _BUNDLE.value is not None
  if exporting == evaluating:
    fail(
      "give either --workdir=DIR --out=FILE (export), --bundle=FILE --evaluate (evaluate) "
      "or --bundle=FILE --onnx=OUT.onnx (ONNX)"
    )
  try:
    exit_rule = parse_exit(_EXIT.value)
    if _ONNX.value is not None:
      if exporting or _EVALUATE.value or _EXIT_SWEEP.value:
        raise UsageError(
          "--onnx=OUT.onnx goes with --bundle=FILE alone (and --input_shape, --exit)"
        )
      export_onnx(_BUNDLE.value, _ONNX.value, exit_rule)
    elif exporting:
      if _WORKDIR.value is None or _OUT.value is None:
        raise UsageError("export needs both --workdir=DIR and --out=FILE")
      if exit_rule is not None or _EXIT_SWEEP.value:
        raise UsageError("--exit and --exit_sweep go with --bundle=FILE --evaluate")
      export(
        _WORKDIR.value,
        _OUT.value,
        report_dir=_REPORT_DIR.value,
        report_batches=_REPORT_BATCHES.value,
      )
    else:
      if _BUNDLE.value is None or not _EVALUATE.value:
        raise UsageError("evaluation needs both --bundle=FILE and --evaluate")
      evaluate(
        _BUNDLE.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        batch_size=_BATCH_SIZE.value,
        report_dir=_REPORT_DIR.value,
        exit_rule=exit_rule,
        exit_sweep=_EXIT_SWEEP.value,
      )
  except UsageError as error:
    fail(str(error))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
