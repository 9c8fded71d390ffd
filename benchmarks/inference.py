"""Inference speed of a deployed network on the CPU: the ONNX export in onnxruntime, the library's
JAX runtime and the PyTorch reference in evaluation mode, with the same weights, in one run.

    python -m benchmarks.inference [--networks=convnet28,resnet18] [--batches=1,128]
        [--cores=2,1] [--repeats=5] [--out=benchmarks/results/inference_cpu.json] [--smoke]

For each network (``convnet28`` on 28x28x1, ``resnet18`` on 32x32x3; binary weights, T = 4,
random weights folded by :func:`empf_jax.deploy.deploy`) and batch size, three runtimes classify a
batch of random images over all T steps:

* ``onnxruntime``: :func:`empf_jax.deploy.export.to_onnx` in an ``InferenceSession`` (CPU provider,
  intra-op threads = cores);
* ``jax``: :func:`empf_jax.deploy.run` jitted (unpacks the sign bits in the program);
* ``torch``: ``benchmarks.torch_reference.run_eval`` (eager, NCHW, one call per step) with the same
  weights (:func:`empf_jax.convert.to_torch_state_dict`), in ``torch.no_grad``.

All three run the same batch; the first call of each is untimed (JAX compiles there), then the
runtimes take turns for ``--repeats`` rounds so that each sees the same machine load. Figures are
the median examples per second (one example = all T steps). Each core count of ``--cores`` runs in
its own process pinned to that many cores (XLA and PyTorch size their thread pools when they
start); the processes run one after another, twice, in alternating order, and each figure is the
median of its two processes' medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

NETWORKS = {"convnet28": (28, 1), "resnet18": (32, 3)}
RUNTIMES = ("onnxruntime", "jax", "torch")
TIME_STEPS = 4
NUM_CLASSES = 10
SMOKE = dict(networks=["convnet28"], batches=[2], repeats=2, width=1 / 8)


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--networks", default="convnet28,resnet18")
  parser.add_argument("--batches", type=_ints, default=[1, 128])
  parser.add_argument(
    "--cores",
    type=_ints,
    default=None,
    help="core counts, each in its own process (default: all, then 1)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.networks = args.networks.split(",")
  for name in args.networks:
    if name not in NETWORKS:
      parser.error(f"--networks: {name!r} is not allowed; allowed: {', '.join(NETWORKS)}")
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
  available = len(os.sched_getaffinity(0))
  if args.cores is None:
    args.cores = [1] if args.smoke else sorted({available, 1}, reverse=True)
  for cores in args.cores:
    if not 1 <= cores <= available:
      parser.error(f"--cores: {cores} is not allowed; allowed: 1..{available}")
  return args


def measure(args: argparse.Namespace, cores: int) -> dict[str, Any]:
  """One process's figures, pinned to ``cores`` cores: {network: {batch: {runtime: rate}}}."""
  from benchmarks.throughput import pin_cores

  pin_cores(cores)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  import jax
  import numpy as np
  import onnxruntime as ort
  import torch
  from flax import nnx

  from benchmarks import torch_reference as ref
  from empf_jax import convert, deploy, models
  from empf_jax.deploy import export

  torch.set_num_threads(cores)
  out: dict[str, Any] = {}
  for name in args.networks:
    size, channels = NETWORKS[name]
    model = models.create(
      name,
      num_classes=NUM_CLASSES,
      time_steps=TIME_STEPS,
      width=args.width,
      in_channels=channels,
      rngs=nnx.Rngs(0),
    )
    torch_model = ref.create(
      name, num_classes=NUM_CLASSES, time_steps=TIME_STEPS, width=args.width, in_channels=channels
    )
    torch_model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in convert.to_torch_state_dict(model).items()}
    )
    deployed = deploy.deploy(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
      export.to_onnx(deployed, (size, size, channels)).SerializeToString(),
      options,
      providers=["CPUExecutionProvider"],
    )
    run = jax.jit(deploy.run)
    out[name] = {}
    for batch in args.batches:
      rng = np.random.default_rng(batch)
      images = rng.uniform(0, 1, (batch, size, size, channels)).astype(np.float32)
      x = np.broadcast_to(images, (TIME_STEPS, *images.shape)).copy()
      x_torch = ref.repeat_static(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), TIME_STEPS)
      calls = {
        "onnxruntime": functools.partial(
          lambda s, x: s.run(["prediction"], {"x": x})[0], session, x
        ),
        "jax": functools.partial(
          lambda r, d, x: np.asarray(r(d, x).sum(0).argmax(-1)), run, deployed, x
        ),
        "torch": functools.partial(
          lambda m, x: ref.run_eval(m, x).sum(0).argmax(-1).numpy(), torch_model, x_torch
        ),
      }
      predictions = {runtime: call() for runtime, call in calls.items()}  # untimed first call
      agree = {
        runtime: float(np.mean(p == predictions["jax"])) for runtime, p in predictions.items()
      }
      seconds: dict[str, list[float]] = {runtime: [] for runtime in calls}
      for _ in range(args.repeats):
        for runtime, call in calls.items():
          start = time.perf_counter()
          call()
          seconds[runtime].append(time.perf_counter() - start)
      out[name][str(batch)] = {
        runtime: {
          "examples_per_second": batch / statistics.median(s),
          "seconds": [round(v, 5) for v in s],
          "predictions_equal_to_jax": agree[runtime],
        }
        for runtime, s in seconds.items()
      }
      rates = {r: round(v["examples_per_second"], 1) for r, v in out[name][str(batch)].items()}
      print(f"{cores} cores, {name}, batch {batch}: {rates} examples/s", flush=True)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.worker is not None:
    print(json.dumps(measure(args, args.worker)))
    return {}
  import jax
  import onnxruntime
  import torch

  from benchmarks.throughput import cpu_description, load_average

  # Each core count twice, in alternating order (--smoke: once).
  order = args.cores if args.smoke else args.cores + args.cores[::-1]
  runs: dict[int, list[dict[str, Any]]] = {cores: [] for cores in args.cores}
  passed = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")]
  for cores in order:
    done = subprocess.run(
      [sys.executable, "-m", "benchmarks.inference", *passed, f"--worker={cores}"],
      capture_output=True,
      text=True,
      check=False,
    )
    sys.stderr.write("".join(line + "\n" for line in done.stdout.splitlines()[:-1]))
    if done.returncode != 0:
      raise SystemExit(f"the {cores}-core process failed: {done.stderr[-2000:]}")
    runs[cores].append(json.loads(done.stdout.splitlines()[-1]))
  results: dict[str, Any] = {}
  for cores, measured in runs.items():
    for name in args.networks:
      for batch in map(str, args.batches):
        entry = {}
        for runtime in RUNTIMES:
          rates = [m[name][batch][runtime]["examples_per_second"] for m in measured]
          entry[runtime] = {
            "examples_per_second": round(statistics.median(rates), 2),
            "per_process": [round(r, 2) for r in rates],
            "predictions_equal_to_jax": min(
              m[name][batch][runtime]["predictions_equal_to_jax"] for m in measured
            ),
          }
        fastest = max(RUNTIMES, key=lambda r: entry[r]["examples_per_second"])
        entry["fastest"] = fastest
        entry["onnxruntime_over_torch"] = round(
          entry["onnxruntime"]["examples_per_second"] / entry["torch"]["examples_per_second"], 3
        )
        entry["jax_over_torch"] = round(
          entry["jax"]["examples_per_second"] / entry["torch"]["examples_per_second"], 3
        )
        results.setdefault(f"{cores}_cores", {}).setdefault(name, {})[batch] = entry
  record = {
    "meta": {
      "command": "python -m benchmarks.inference "
      + " ".join(argv if argv is not None else sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "time_steps": TIME_STEPS,
      "width": args.width,
      "repeats": args.repeats,
      "weights": "binary",
      "jax": jax.__version__,
      "onnxruntime": onnxruntime.__version__,
      "torch": torch.__version__,
      "python": platform.python_version(),
      **cpu_description(),
      "load_average_end": load_average(),
    },
    "results": results,
  }
  for cores, by_network in results.items():
    for name, by_batch in by_network.items():
      for batch, entry in by_batch.items():
        print(
          f"{cores}, {name}, batch {batch}: "
          + ", ".join(f"{r} {entry[r]['examples_per_second']:.1f}/s" for r in RUNTIMES)
          + f"; onnxruntime/torch {entry['onnxruntime_over_torch']}, "
          f"jax/torch {entry['jax_over_torch']}, fastest {entry['fastest']}"
        )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")
  return record


if __name__ == "__main__":
  main()
