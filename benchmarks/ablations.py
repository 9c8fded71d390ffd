"""Ablations on one config: accuracy, training time per epoch and compiled train-step memory.

    python -m benchmarks.ablations --config=experiments/configs/digits.py \
        --modes=online,online_float,bptt_lif,online_lif --workdir=runs/ablation_digits \
        [--epochs=N] [--out=benchmarks/results/ablation_digits.json]

Training goes through ``benchmarks.compare_modes`` (same CLI, same per-mode workdirs, so an
interrupted run resumes); this script adds, for every mode, the training time per epoch (training
examples per epoch / median training images per second, i.e. without compilation and
evaluation), the wall time of the whole run per epoch, and the memory of the mode's compiled
train step (``benchmarks.memory.train_step_memory`` on the config's network, batch and input).
Modes: see ``benchmarks.compare_modes.MODES`` (``online_float``: full-precision block weights;
``bptt_lif`` / ``online_lif``: the LIF baseline trained by BPTT / online).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any

import jax

from benchmarks import compare_modes, memory

MIB = 2**20


def load_config(path: str, overrides: list[str]):
  """``get_config([variant])`` of a config file ``FILE[:variant]`` with ``--config.key=value``
  flags applied."""
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for flag in overrides:
    if not flag.startswith("--config."):
      raise ValueError(f"override {flag!r} is not allowed; allowed: --config.key=value")
    key, value = flag[len("--config.") :].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    kind = node.get_type(leaf)  # also for None fields (ml_collections placeholders)
    if kind is bool:
      node[leaf] = value.lower() in ("1", "true", "yes")
    else:
      node[leaf] = None if value == "None" else kind(value)
  return config


def _train_data(config):
  from experiments import input as data_input

  return data_input.load(
    config.dataset,
    "train",
    batch_size=config.batch_size,
    train=True,
    seed=config.seed,
    augment=False,
  )


def _step_arguments(config, data) -> dict[str, Any]:
  """The keyword arguments of :func:`benchmarks.memory.train_step_memory` for a config: its
  network (:func:`experiments.train.net_options`, without T), rule, T, batch and input."""
  from experiments import train

  network = dataclasses.asdict(train.net_options(config, data.num_classes, train.step_shape(data)))
  del network["time_steps"]
  return dict(
    network=network,
    mode=config.mode,
    time_steps=config.time_steps,
    batch=config.batch_size,
    image_shape=data.input_shape,
    static_input=not data.time_major,
  )


def dry_run(config, data=None) -> dict[str, Any]:
  """One train step of a config traced on abstract inputs (nothing compiled or allocated): the
  config's network builds and trains as :func:`mode_memory` would compile it.

  Args:
    config: a training config.
    data: its training split (or anything with ``num_classes``, ``input_shape`` and
      ``time_major``); default: loaded.

  Returns:
    ``network`` (the options) and ``loss``, the abstract loss of the step.
  """
  arguments = _step_arguments(config, data if data is not None else _train_data(config))
  step, args = memory.abstract_train_step(**arguments)
  _, output = jax.eval_shape(step, *args)
  return {"network": arguments["network"], "loss": output.loss}


def mode_memory(config) -> dict[str, Any]:
  """Compiled train-step memory of a config (its network, rule, T, batch and input shape)."""
  data = _train_data(config)
  arguments = _step_arguments(config, data)
  point = memory.train_step_memory(**arguments)
  return {
    "network": arguments["network"],
    "bytes": point["bytes"],
    "examples_per_epoch": data.batches_per_epoch * config.batch_size,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--out", default=None, help="JSON path (default benchmarks/results/ablation_<config name>.json)"
  )
  own, rest = parser.parse_known_args(argv)
  args = compare_modes.parse_args(rest)
  compare_modes.main(rest)
  with open(args.results or os.path.join(args.workdir, "results.json")) as f:
    compared = json.load(f)
  rows = []
  for result in compared["results"]:
    config = load_config(
      args.config,
      compare_modes.MODES[result["mode"]]
      + args.extra
      + ([f"--config.epochs={args.epochs}"] if args.epochs else [])
      + ([f"--config.model.width={args.width}"] if args.width else []),
    )
    mem = mode_memory(config)
    rate = result["median_train_images_per_second"]
    rows.append(
      {
        "mode": result["mode"],
        "accuracy": result["accuracy"],
        "accuracy_per_step": result["accuracy_per_step"],
        "train_seconds_per_epoch": mem["examples_per_epoch"] / rate if rate else None,
        "wall_seconds_per_epoch": (
          result["wall_seconds_this_call"] / config.epochs
          if result["wall_seconds_this_call"]
          else None
        ),
        "median_train_images_per_second": rate,
        "train_step_memory_bytes": mem["bytes"],
        "network": mem["network"],
        "rule": config.mode,
        "time_steps": config.time_steps,
        "batch": config.batch_size,
        "epochs": config.epochs,
      }
    )
  name = os.path.splitext(os.path.basename(args.config))[0]
  out = own.out or f"benchmarks/results/ablation_{name}.json"
  record = {
    "meta": {
      **compared["meta"],
      **memory.environment(),
      "command": "python -m benchmarks.ablations "
      + " ".join(argv if argv is not None else sys.argv[1:]),
    },
    "results": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  print("| mode | test accuracy (t = T) | train s/epoch | wall s/epoch | train-step memory (MiB) |")
  print("|---|---|---|---|---|")
  for r in rows:
    per_epoch = f"{r['train_seconds_per_epoch']:.1f}" if r["train_seconds_per_epoch"] else "-"
    wall = f"{r['wall_seconds_per_epoch']:.1f}" if r["wall_seconds_per_epoch"] else "-"
    print(
      f"| {r['mode']} | {100 * r['accuracy']:.2f} % | {per_epoch} | {wall} | "
      f"{r['train_step_memory_bytes']['total'] / MIB:.1f} |"
    )
  return record


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
