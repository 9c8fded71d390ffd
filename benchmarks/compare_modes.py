"""Trains the same network with several training rules and tabulates test accuracy and time.

    python -m benchmarks.compare_modes --config=experiments/configs/fashion_mnist.py \
        --workdir=runs/compare_fmnist [--epochs=N] [--width=W] [--modes=online,random_step,bptt_lif]

Modes: ``online`` (EM-PF, online rule), ``random_step`` (EM-PF, random single-step rule),
``bptt_lif`` (LIF baseline trained by BPTT), ``online_lif`` (LIF, online rule), ``bptt`` (EM-PF
trained by BPTT), ``online_float`` (EM-PF, online, full-precision weights). Every mode uses the
same network, epochs, batch size, learning rate and seed. Each mode trains in its own workdir
(``WORKDIR/MODE``), so an interrupted comparison resumes where it stopped, and modes may be run
by separate calls into the same WORKDIR. Results go to ``--results`` (default
``WORKDIR/results.json``) and, beside it, a Markdown table (``.md``) and a plot of test accuracy
against epoch (``.png``). A results file that exists is updated: the modes of this call replace
their entries, the other modes' entries are kept, so that rules trained on different days (or
machines) end in one table. ``--collect`` writes them from what the workdirs hold without
training.

Per mode: test accuracy at t = 1..T (final epoch), every epoch's accuracy, the training time (the
sum of the epochs' training seconds, without evaluation and BatchNorm re-estimation), the median
training image rate, and the train step's memory (XLA's memory analysis of the compiled step for
the run's network, rule and batch, temporary + argument bytes, as ``benchmarks.ablations``),
both derived from each entry's epochs and flags, so entries written before they were recorded
get them too.
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
  parser.add_argument(
    "--modes", default="online,random_step,bptt_lif", type=names_in(MODES, "mode(s)")
  )
  parser.add_argument(
    "--extra", action="append", default=[], help="further --config.key=value flags for every mode"
  )
  parser.add_argument(
    "--results",
    default=None,
    help="JSON results file to write or update (default WORKDIR/results.json)",
  )
  parser.add_argument(
    "--collect",
    action="store_true",
    help="train nothing: tabulate and plot what each mode's workdir holds, "
    "unfinished runs included (their last evaluated epoch)",
  )
  return parser.parse_args(argv)


def run_mode(args, mode: str) -> dict:
  workdir = os.path.join(args.workdir, mode)
  flags = [
    f"--workdir={workdir}",
    f"--config={args.config}",
    "--config.progress=False",
    *MODES[mode],
    *args.extra,
  ]
  if args.epochs is not None:
    flags.append(f"--config.epochs={args.epochs}")
  if args.width is not None:
    flags.append(f"--config.model.width={args.width}")
  seconds = None
  if not args.collect:
    start = time.perf_counter()
    print(f"== {mode}: python -m experiments.cifar {' '.join(flags)}", flush=True)
    subprocess.run([sys.executable, "-m", "experiments.cifar", *flags], check=True)
    seconds = time.perf_counter() - start
  return {"mode": mode, **collect(workdir), "wall_seconds_this_call": seconds, "flags": flags}


def collect(workdir: str) -> dict:
  """A mode's figures from its workdir: the summary of a finished run, else the newest evaluated
  epoch; every epoch's test accuracy; the median training image rate."""
  records = []
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    with open(os.path.join(workdir, "metrics.jsonl")) as lines:
      records = [json.loads(line) for line in lines]
  evals = {r["epoch"]: r for r in records if r["kind"] == "eval"}
  epochs = [
    {
      "epoch": e + 1,
      "accuracy": evals[e]["accuracy"],
      "accuracy_per_step": evals[e]["accuracy_per_step"],
      "accuracy_reestimated": evals[e].get("accuracy_reestimated"),
      "train_seconds": evals[e].get("train_seconds"),
    }
    for e in sorted(evals)
  ]
  rates = sorted(r["images_per_second"] for r in records if r["kind"] == "train")
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      last = json.load(f)
  else:
    last = epochs[-1] if epochs else {"accuracy": None, "accuracy_per_step": []}
  return {
    "finished": os.path.exists(summary_path),
    "accuracy": last["accuracy"],
    "accuracy_per_step": last["accuracy_per_step"],
    "epochs": epochs,
    "median_train_images_per_second": rates[len(rates) // 2] if rates else None,
  }


def step_memory(flags: list[str]) -> int | None:
  """Temporary + argument bytes of the compiled train step of the run that ``flags`` (its
  ``experiments.cifar`` flags: ``--config=PATH`` and ``--config.KEY=VALUE`` overrides)
  describe, as ``benchmarks.ablations`` measures it."""
  from benchmarks import config_memory

  path = next(f.split("=", 1)[1] for f in flags if f.startswith("--config="))
  overrides = [f for f in flags if f.startswith("--config.")]
  return config_memory.mode_memory(config_memory.load_config(path, overrides))["bytes"]["total"]


def completed(entry: dict) -> dict:
  """``entry`` with its training time (the sum of its epochs' training seconds) and its
  train-step memory (from its flags, measured once: an entry that holds it keeps it)."""
  entry = dict(entry)
  seconds = [e["train_seconds"] for e in entry["epochs"] if e.get("train_seconds") is not None]
  entry["train_seconds"] = sum(seconds) if seconds else None
  if entry.get("train_step_memory_bytes") is None and entry.get("flags"):
    entry["train_step_memory_bytes"] = step_memory(entry["flags"])
  return entry


def merged(path: str, results: list[dict]) -> list[dict]:
  """The entries of the results file at ``path`` (if any) with those of ``results`` replacing
  the entries of their modes, in the order of :data:`MODES`. A new entry without any evaluated
  epoch (its workdir is gone or was never trained) does not replace an earlier one that has
  them: collecting a rule on a machine that no longer holds its run keeps the committed figures."""
  entries = {}
  if os.path.exists(path):
    with open(path) as f:
      entries = {r["mode"]: r for r in json.load(f)["results"]}
  for r in results:
    if r["epochs"] or not entries.get(r["mode"], {}).get("epochs"):
      entries[r["mode"]] = r
    else:
      print(f"{r['mode']}: its workdir holds no evaluated epoch; keeping the entry of {path}")
  return [completed(entries[mode]) for mode in MODES if mode in entries]


def table(results: list[dict]) -> str:
  """The Markdown table of :func:`main`: one row per mode."""
  lines = [
    "| mode | test accuracy (t = T) | accuracy at t = 1..T | training time | "
    "train img/s | train-step memory |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    if r["accuracy"] is None:
      continue
    per_step = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_per_step"])
    rate = r["median_train_images_per_second"]
    seconds = r.get("train_seconds")
    mem = r.get("train_step_memory_bytes")
    name = r["mode"] if r["finished"] else f"{r['mode']} (epoch {r['epochs'][-1]['epoch']})"
    lines.append(
      f"| {name} | {100 * r['accuracy']:.2f} % | {per_step} | "
      + (f"{seconds / 60:.0f} min | " if seconds else "- | ")
      + (f"{rate:.0f} | " if rate else "- | ")
      + (f"{mem / 2**20:.0f} MiB |" if mem else "- |")
    )
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  """Test accuracy (t = T) against epoch, one line per mode."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    if r["epochs"]:
      ax.plot(
        [e["epoch"] for e in r["epochs"]],
        [100 * e["accuracy"] for e in r["epochs"]],
        marker="o",
        label=r["mode"] + ("" if r["finished"] else " (unfinished)"),
      )
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy at t = T (%)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  results = [run_mode(args, mode) for mode in args.modes.split(",")]
  meta = {
    "config": args.config,
    "epochs": args.epochs,
    "width": args.width,
    "extra": args.extra,
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "date": time.strftime("%Y-%m-%d"),
  }
  for r in results:
    r["date"] = meta["date"]
  path = args.results or os.path.join(args.workdir, "results.json")
  results = merged(path, results)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=2)
  stem = os.path.splitext(path)[0]
  text = table(results)
  with open(stem + ".md", "w") as f:
    f.write(text + "\n")
  plot(results, stem + ".png")
  print(text)


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
