"""Throughput of the ImageNet input pipeline on synthetic JPEGs, in images per second.

Runs :class:`experiments.input.pipeline.GrainBatches` over an ``ExampleReader`` with the training
preprocessing (:func:`~experiments.input.imagenet.train_image`: decode, random resized crop 224,
flip, normalisation) and, separately, the evaluation preprocessing, on JPEG bytes of 500x375
synthetic images held in memory, pinned to ``--cores`` CPU cores, once for every number of grain
worker processes in ``--workers``, and with 0 workers once for every number of threads of this
process in ``--threads`` (grain's read threads, each making whole batches). The figure therefore
measures decoding and augmentation, not storage. Other jobs may share the cores: the load average
before
and after the run is recorded with the figures, together with the CPU time per image of this
process and its workers (nearly independent of that load).

Usage, from the repository root::

  python -m benchmarks.input_imagenet [--cores=2] [--workers=0,1,2] [--threads=1,2]
      [--batches=24]

Prints the figures and writes them to ``benchmarks/results/input_imagenet.json``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import time

import numpy as np
import psutil
from absl import app, flags
from PIL import Image

from experiments.input import imagenet, pipeline

_CORES = flags.DEFINE_integer("cores", 2, "CPU cores to pin the process and its workers to.")
_WORKERS = flags.DEFINE_list(
  "workers", ["0", "1", "2"], "Worker process counts to measure (0: threads of this process)."
)
_THREADS = flags.DEFINE_list(
  "threads", ["1", "2"], "Thread counts of this process measured with 0 workers."
)
_BATCHES = flags.DEFINE_integer("batches", 24, "Timed batches per preprocessing.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
_DISTINCT = flags.DEFINE_integer("distinct_images", 64, "Distinct synthetic JPEGs cycled over.")
_OUTPUT = flags.DEFINE_string(
  "output",
  os.path.join(os.path.dirname(__file__), "results", "input_imagenet.json"),
  "Where to write the JSON figures.",
)

_WIDTH, _HEIGHT, _QUALITY = 500, 375, 90
_WARMUP_BATCHES = 2


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """JPEG bytes of ``count`` photo-like 500x375 images: a smooth random field plus pixel noise.

  Pure pixel noise would make every JPEG several times larger (and slower to decode) than a
  typical ImageNet photograph; the smooth field gives sizes close to ImageNet's ~110 kB.
  """
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((_WIDTH, _HEIGHT), Image.Resampling.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0.0, 12.0, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=_QUALITY)
    images.append(buffer.getvalue())
  return images


class SyntheticExamples:
  """Example i: the preprocessed JPEG i mod len(jpegs), label 0 (picklable, for the workers)."""

  def __init__(self, jpegs: list[bytes]):
    self._jpegs = jpegs

  def __call__(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    data = self._jpegs[index % len(self._jpegs)]
    return (imagenet.eval_image(data) if rng is None else imagenet.train_image(data, rng)), 0


def _cpu_seconds(process: psutil.Process) -> float:
  """User and system CPU seconds of ``process`` and of its living children."""
  total = 0.0
  for member in [process] + process.children(recursive=True):
    try:
      times = member.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += times.user + times.system
  return total


def measure(
  jpegs: list[bytes], *, train: bool, workers: int, batch_size: int, batches: int, threads: int = 1
) -> tuple[float, float]:
  """Times ``batches`` batches of the pipeline after a short warm-up (which starts the workers).

  Returns:
    Images per second of wall-clock time, and CPU milliseconds (this process and its workers)
    per image.
  """
  num_examples = (batches + _WARMUP_BATCHES) * batch_size
  reader = pipeline.ExampleReader(SyntheticExamples(jpegs), num_examples, (224, 224, 3))
  batched = pipeline.GrainBatches(
    reader,
    num_classes=1000,
    batch_size=batch_size,
    train=train,
    seed=0,
    augment=train,
    num_workers=workers,
    num_threads=threads,
  )
  iterator = batched.epoch(0)
  for _ in range(_WARMUP_BATCHES):
    next(iterator)
  process = psutil.Process()
  start, cpu_start = time.perf_counter(), _cpu_seconds(process)
  timed = sum(next(iterator)[0].shape[0] for _ in range(batches))
  # Measured before the workers end, while their CPU time still counts.
  wall, cpu = time.perf_counter() - start, _cpu_seconds(process) - cpu_start
  iterator.close()
  return timed / wall, 1e3 * cpu / timed


def main(argv):
  del argv
  available = sorted(os.sched_getaffinity(0))
  if _CORES.value > len(available):
    raise app.UsageError(f"--cores={_CORES.value} but only {len(available)} cores are available")
  os.sched_setaffinity(0, available[: _CORES.value])
  jpegs = synthetic_jpegs(_DISTINCT.value)
  load_before = os.getloadavg()
  result = {}
  settings = [
    (workers, threads)
    for workers in map(int, _WORKERS.value)
    for threads in (map(int, _THREADS.value) if workers == 0 else [1])
  ]
  for workers, threads in settings:
    # "0_workers" alone is one thread, as in earlier result files.
    suffix = f"{workers}_workers" + (f"_{threads}_threads" if threads > 1 else "")
    for name, train in (("train", True), ("eval", False)):
      rate, cpu_ms = measure(
        jpegs,
        train=train,
        workers=workers,
        batch_size=_BATCH_SIZE.value,
        batches=_BATCHES.value,
        threads=threads,
      )
      result[f"{name}_images_per_second_{suffix}"] = round(rate, 1)
      result[f"{name}_cpu_ms_per_image_{suffix}"] = round(cpu_ms, 2)
  for name in ("train", "eval"):
    if {"1", "2"} <= set(_WORKERS.value):
      result[f"{name}_speedup_1_to_2_workers"] = round(
        result[f"{name}_images_per_second_2_workers"]
        / result[f"{name}_images_per_second_1_workers"],
        2,
      )
  result.update(
    {
      "cores": _CORES.value,
      "batch_size": _BATCH_SIZE.value,
      "timed_images": _BATCHES.value * _BATCH_SIZE.value,
      "jpeg": f"{_WIDTH}x{_HEIGHT}, quality {_QUALITY}, mean "
      f"{np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB",
      "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs in total",
      "pillow": Image.__version__,
      "note": "wall-clock rates are the share of the cores this process and its workers got; "
      "with a 1-minute load average above the core count, other jobs were competing "
      "for them",
    }
  )
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  app.run(main)
