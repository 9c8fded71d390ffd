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
import json
import os
import sys
from typing import Any

from benchmarks import compare_modes, memory
from benchmarks.config_memory import load_config, mode_memory

MIB = 2**20


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
