"""Candidate causes of the gap between the stored and the re-estimated BatchNorm averages.

    python -m benchmarks.investigations.bn_causes --workdir=runs/bn_causes [--epochs=1] \
        [--config=experiments/configs/fashion_mnist.py] [--candidates=baseline,lr_0.01,...]

Every candidate trains with the training running averages kept (``bn_recalibration_batches=0``)
and changes one thing against ``baseline`` (:data:`BASELINE`: the setting where those averages
collapsed); at every epoch end
the driver evaluates with the stored averages and with averages re-estimated from
``bn_check_batches`` training batches, and records per binary kernel the fraction of weight
codes each update changes, the update's size relative to the latent weights and the latent
magnitudes (``metrics.jsonl``). This program collects those records into
``WORKDIR/bn_causes.json``, a Markdown table and a plot (``bn_causes.png``: the gap, the sign
changes per update and the relative update size per candidate). Each candidate trains in its own
workdir (``WORKDIR/NAME``), so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import compare_modes

# The setting where the running averages of training collapsed: the previous Fashion-MNIST network
# (convnet_small, global average pooling after one pooling) at width 0.5, batch 64, SGD 0.05.
BASELINE = [
  "--config.model.name=convnet_small",
  "--config.model.width=0.5",
  "--config.batch_size=64",
  "--config.learning_rate=0.05",
]
CANDIDATES = {
  "baseline": [],
  "lr_0.01": ["--config.learning_rate=0.01"],
  "lr_0.1": ["--config.learning_rate=0.1"],
  "no_latent_decay": ["--config.decay_latent_weights=False"],
  "symmetric_init_0.05": ["--config.model.latent_init=0.05", "--config.model.symmetric_init=True"],
  "one_update_per_batch": ["--config.mode=random_step"],
  "convnet28": [
    "--config.model.name=convnet28",
    "--config.model.width=1.0",
    "--config.batch_size=128",
  ],
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/configs/fashion_mnist.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument(
    "--candidates",
    default=",".join(CANDIDATES),
    type=compare_modes.names_in(CANDIDATES, "candidate(s)"),
  )
  parser.add_argument(
    "--extra",
    action="append",
    default=[],
    help="further --config.key=value flags for every candidate",
  )
  return parser.parse_args(argv)


def read_records(workdir: str) -> dict:
  """The eval and weights records of one run, by epoch (the newest record of each epoch)."""
  evals, weights = {}, {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["kind"] == "eval":
        evals[record["epoch"]] = record
      elif record["kind"] == "weights":
        weights[record["epoch"]] = record
  return {
    "eval": [evals[e] for e in sorted(evals)],
    "weights": [weights[e] for e in sorted(weights)],
  }


def run_candidate(args, name: str) -> dict:
  workdir = os.path.join(args.workdir, name)
  flags = [
    f"--workdir={workdir}",
    f"--config={args.config}",
    "--config.progress=False",
    f"--config.epochs={args.epochs}",
    "--config.warmup_epochs=0",
    "--config.bn_recalibration_batches=0",
    *BASELINE,
    *CANDIDATES[name],
    *args.extra,
  ]
  print(f"== {name}: python -m experiments.cifar {' '.join(flags)}", flush=True)
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "experiments.cifar", *flags], check=True)
  return {
    "name": name,
    "flags": flags,
    "wall_seconds_this_call": time.perf_counter() - start,
    **read_records(workdir),
  }


def _mean_over_kernels(record: dict, prefix: str) -> float:
  values = [v for k, v in record.items() if k.startswith(prefix + "/")]
  return sum(values) / len(values)


def table(results: list[dict]) -> str:
  lines = [
    "| candidate | epoch | stored averages | re-estimated | gap (points) | "
    "codes changed per update | relative update size | median latent abs |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for ev, w in zip(r["eval"], r["weights"]):
      lines.append(
        f"| {r['name']} | {ev['epoch'] + 1} | {100 * ev['accuracy']:.2f} % | "
        f"{100 * ev['accuracy_reestimated']:.2f} % | {100 * ev['bn_gap']:.2f} | "
        f"{100 * _mean_over_kernels(w, 'code_change'):.3f} % | "
        f"{_mean_over_kernels(w, 'update_ratio'):.4f} | "
        f"{_mean_over_kernels(w, 'latent_abs_p50'):.2e} |"
      )
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  names = [r["name"] for r in results]
  gap = [100 * r["eval"][-1]["bn_gap"] for r in results]
  flips = [100 * _mean_over_kernels(r["weights"][-1], "code_change") for r in results]
  ratio = [_mean_over_kernels(r["weights"][-1], "update_ratio") for r in results]
  for ax, values, title in zip(
    axes,
    (gap, flips, ratio),
    (
      "re-estimated minus stored accuracy (points)",
      "weight signs changed per update (%)",
      "||dW|| / ||W|| per update",
    ),
  ):
    ax.barh(names, values, color="tab:blue")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
  for ax in axes[1:]:
    ax.set_yticklabels([])
  fig.suptitle("Stored vs re-estimated BatchNorm averages after the last epoch, per candidate")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  meta = {
    "config": args.config,
    "epochs": args.epochs,
    "baseline": BASELINE,
    "extra": args.extra,
    "date": time.strftime("%Y-%m-%d"),
    "load_start": os.getloadavg(),
  }
  results = []
  for name in args.candidates.split(","):
    results.append(run_candidate(args, name))
    meta["load_end"] = os.getloadavg()
    # Written after every candidate, so that an interrupted comparison keeps what it measured.
    with open(os.path.join(args.workdir, "bn_causes.json"), "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=2)
  text = table(results)
  with open(os.path.join(args.workdir, "bn_causes.md"), "w") as f:
    f.write(text + "\n")
  plot(results, os.path.join(args.workdir, "bn_causes.png"))
  print(text)


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
