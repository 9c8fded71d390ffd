"""What data parallelism buys at an epoch's end: evaluation and BatchNorm re-estimation time with
the batch kept split over the devices, against the plain time fold that gathers it.

The training program's evaluation and re-estimation steps run under its mesh
(``experiments.train.OnMesh``), so that :func:`empf_jax.ops.fold_time` keeps each device's
examples on that device. Traced without the mesh, the same steps fold [T, B] with B split into
one axis, which XLA's partitioner can only get by gathering the whole batch onto every device:
each device then computes the whole global batch. This benchmark compiles both forms of the two
steps of one config (``--config``, default digits) on ``--devices`` host devices, times
``Trainer.evaluate`` (the whole test set) and ``Trainer.reestimated`` (the config's
``bn_recalibration_batches``), the two forms alternated over ``--repeats``, and reports the
medians with the load average before and after.

Usage, from the repository root::

  python -m benchmarks.investigations.epoch_end [--devices=2] [--repeats=5] \
      [--config=experiments/configs/digits.py]

Writes ``benchmarks/results/epoch_end.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=2, help="XLA host devices (>= 2)")
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each form")
  parser.add_argument(
    "--config", default="experiments/configs/digits.py", help="config file (FILE or FILE:variant)"
  )
  parser.add_argument("--out", default="benchmarks/results/epoch_end.json")
  args = parser.parse_args(argv)
  if args.devices < 2:
    parser.error(f"--devices={args.devices} is not allowed; allowed: an integer >= 2")
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} is not allowed; allowed: an integer >= 1")
  return args


def _timed(fn) -> float:
  tick = time.perf_counter()
  fn()
  return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  import jax

  from benchmarks.config_memory import load_config
  from benchmarks.throughput import cpu_description, load_average, write_record
  from experiments import train

  config = load_config(args.config, [])
  config.progress = False
  trainer = train.Trainer(config, tempfile.mkdtemp(prefix="epoch_end_"))
  count = config.bn_recalibration_batches
  split = (trainer._eval_step, trainer._recalibrate_step)
  gathered = (split[0].jitted, split[1].jitted)  # the same steps traced without the mesh

  def use(steps):
    trainer._eval_step, trainer._recalibrate_step = steps

  def evaluation():
    trainer.evaluate(details=False)

  def reestimation():
    jax.block_until_ready(trainer.reestimated(count))

  forms = {"split": split, "gathered": gathered}
  times: dict[str, dict[str, list[float]]] = {
    name: {"evaluate": [], "reestimate": []} for name in forms
  }
  for steps in forms.values():  # compile
    use(steps)
    evaluation()
    reestimation()
  load_before = load_average()
  for _ in range(args.repeats):
    for name, steps in forms.items():
      use(steps)
      times[name]["evaluate"].append(_timed(evaluation))
      times[name]["reestimate"].append(_timed(reestimation))
  load_after = load_average()
  medians = {
    name: {key: statistics.median(values) for key, values in entry.items()}
    for name, entry in times.items()
  }
  record = {
    "question": "evaluation and re-estimation time at an epoch's end, batch split against gathered",
    "command": "python -m benchmarks.investigations.epoch_end "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "config": args.config,
    "devices": args.devices,
    "batch_size": config.batch_size,
    "reestimation_batches": count,
    "test_batches": trainer.test_data.batches_per_epoch,
    "jax": jax.__version__,
    "python": platform.python_version(),
    **cpu_description(),
    "load_before": load_before,
    "load_after": load_after,
    "seconds": times,
    "median_seconds": medians,
    "gathered_over_split": {
      key: medians["gathered"][key] / medians["split"][key] for key in ("evaluate", "reestimate")
    },
  }
  for name, entry in medians.items():
    print(
      f"{name:>8}: evaluate {entry['evaluate']:.3f} s, re-estimate ({count} batches) "
      f"{entry['reestimate']:.3f} s"
    )
  print(
    "gathered / split: "
    + ", ".join(f"{k} {v:.2f}x" for k, v in record["gathered_over_split"].items())
  )
  write_record(args.out, record)
  return record


if __name__ == "__main__":
  main()
