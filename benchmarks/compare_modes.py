"""Trains the same network with several training rules and tabulates test accuracy and time.

    python -m benchmarks.compare_modes --config=experiments/configs/fashion_mnist.py \
        --workdir=runs/compare_fmnist [--epochs=N] [--width=W] [--modes=online,random_step,bptt_lif]

Modes: ``online`` (EM-PF, online rule), ``random_step`` (EM-PF, random single-step rule),
``bptt_lif`` (LIF baseline trained by BPTT), ``online_lif`` (LIF, online rule), ``bptt`` (EM-PF
trained by BPTT), ``online_float`` (EM-PF, online, full-precision weights). Every mode uses the
same network, epochs, batch size, learning rate and seed. Each mode trains in its own workdir
(``WORKDIR/MODE``), so an interrupted comparison resumes where it stopped. Results go to
``WORKDIR/results.json`` and ``WORKDIR/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax

MODES = {
    "online": [],
    "random_step": ["--config.mode=random_step"],
    "bptt_lif": ["--config.mode=bptt", "--config.model.neuron=lif"],
    "online_lif": ["--config.model.neuron=lif"],
    "bptt": ["--config.mode=bptt"],
    "online_float": ["--config.model.weights=float"],
}


def names_in(allowed, what: str):
  """An argparse ``type``: a comma-separated list of names, each one of ``allowed``."""
  def parse(value: str) -> str:
    unknown = [name for name in value.split(",") if name not in allowed]
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; allowed: {', '.join(allowed)}")
    return value
  return parse


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/configs/fashion_mnist.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--epochs", type=int, default=None, help="override config.epochs")
  parser.add_argument("--width", type=float, default=None, help="override config.model.width")
  parser.add_argument("--modes", default="online,random_step,bptt_lif",
                      type=names_in(MODES, "mode(s)"))
  parser.add_argument("--extra", action="append", default=[],
                      help="further --config.key=value flags for every mode")
  return parser.parse_args(argv)


def run_mode(args, mode: str) -> dict:
  workdir = os.path.join(args.workdir, mode)
  flags = [f"--workdir={workdir}", f"--config={args.config}", "--config.progress=False",
           *MODES[mode], *args.extra]
  if args.epochs is not None:
    flags.append(f"--config.epochs={args.epochs}")
  if args.width is not None:
    flags.append(f"--config.model.width={args.width}")
  summary_path = os.path.join(workdir, "summary.json")
  start = time.perf_counter()
  print(f"== {mode}: python -m experiments.cifar {' '.join(flags)}", flush=True)
  subprocess.run([sys.executable, "-m", "experiments.cifar", *flags], check=True)
  seconds = time.perf_counter() - start
  with open(summary_path) as f:
    summary = json.load(f)
  train_records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["images_per_second"] for r in train_records if r.get("kind") == "train"]
  return {"mode": mode, "accuracy": summary["accuracy"],
          "accuracy_per_step": summary["accuracy_per_step"], "wall_seconds_this_call": seconds,
          "median_train_images_per_second": sorted(rates)[len(rates) // 2] if rates else None,
          "flags": flags}


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  results = [run_mode(args, mode) for mode in args.modes.split(",")]
  meta = {"config": args.config, "epochs": args.epochs, "width": args.width,
          "extra": args.extra, "machine": platform.platform(), "cpus": os.cpu_count(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "date": time.strftime("%Y-%m-%d")}
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=2)
  lines = [f"| mode | test accuracy (t = T) | accuracy per step | train img/s |",
           "|---|---|---|---|"]
  for r in results:
    per_step = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_step"])
    rate = r["median_train_images_per_second"]
    lines.append(f"| {r['mode']} | {100 * r['accuracy']:.2f} % | {per_step} | "
                 f"{rate:.0f} |" if rate else f"| {r['mode']} | {100 * r['accuracy']:.2f} % | "
                 f"{per_step} | - |")
  table = "\n".join(lines)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
