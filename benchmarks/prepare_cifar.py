"""How long preparing CIFAR-10 from its archive takes, and reading the prepared training split.

    python -m benchmarks.prepare_cifar [--out=benchmarks/results/prepare_cifar.json]
        [--workdir=DIR] [--per_batch=10000]

Writes an archive in the official layout at full size (5 training batches and a test batch of
``--per_batch`` random 32x32x3 images each; the real archive has 10,000), then times what the
first run of a CIFAR-10 config does after the download: the conversion
(``experiments.input.cifar_archive.convert``: unpickling, the NHWC arrays, the manifest with every
file's SHA-256) and one read of the training split with its checksums checked
(``read_prepared``). Wall and CPU seconds, and the sizes on disk. The download itself is
170,498,071 bytes (the archive's published size), whose time depends on the connection.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import pickle
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import throughput


def write_archive(path: Path, per_batch: int, seed: int = 0) -> str:
  """A CIFAR-10 archive in the official layout (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``) of random images; returns its MD5."""
  rng = np.random.default_rng(seed)
  members: dict[str, dict] = {}
  for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    members[member] = {
      b"batch_label": member.encode(),
      b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
      b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
      b"filenames": [b"%d.png" % i for i in range(per_batch)],
    }
  members["batches.meta"] = {
    b"label_names": [b"class%d" % i for i in range(10)],
    b"num_cases_per_batch": per_batch,
    b"num_vis": 3072,
  }
  with tarfile.open(path, "w:gz", compresslevel=1) as tar:
    for member, content in members.items():
      payload = pickle.dumps(content, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _timed(function, *args) -> tuple[Any, float, float]:
  wall, cpu = time.perf_counter(), time.process_time()
  result = function(*args)
  return result, time.perf_counter() - wall, time.process_time() - cpu


def _folder_bytes(folder: Path) -> int:
  return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def measure(workdir: Path, per_batch: int) -> dict[str, Any]:
  """Writes the archive into ``workdir``, converts it, reads the training split back."""
  from experiments.input import cifar_archive

  archive = workdir / "cifar-10-python.tar.gz"
  md5 = write_archive(archive, per_batch)
  folder = cifar_archive.prepared_folder("cifar10", workdir)
  folder.mkdir()
  _, convert_wall, convert_cpu = _timed(cifar_archive.convert, "cifar10", archive, folder, md5)
  (images, labels), read_wall, read_cpu = _timed(
    cifar_archive.read_prepared, "cifar10", "train", workdir
  )
  if images.shape != (5 * per_batch, 32, 32, 3) or labels.shape != (5 * per_batch,):
    raise RuntimeError(f"read back {images.shape}, {labels.shape}")
  return {
    "examples": {"train": 5 * per_batch, "test": per_batch},
    "archive_bytes": archive.stat().st_size,
    "prepared_bytes": _folder_bytes(folder),
    "convert_seconds": round(convert_wall, 2),
    "convert_cpu_seconds": round(convert_cpu, 2),
    "read_train_seconds": round(read_wall, 3),
    "read_train_cpu_seconds": round(read_cpu, 3),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="benchmarks/results/prepare_cifar.json")
  parser.add_argument("--workdir", default="", help="where the archive is written (default: temp)")
  parser.add_argument("--per_batch", type=int, default=10_000, help="images per archive batch")
  args = parser.parse_args(argv)
  if args.per_batch < 1:
    parser.error(f"--per_batch={args.per_batch} is not allowed; allowed: 1 or more")
  with tempfile.TemporaryDirectory(dir=args.workdir or None) as workdir:
    record = measure(Path(workdir), args.per_batch)
  record = {
    "command": "python -m benchmarks.prepare_cifar " + " ".join(argv or sys.argv[1:]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": platform.machine(),
    **throughput.cpu_description(),
    "load_average": throughput.load_average(),
    **record,
  }
  if args.out:
    throughput.write_record(args.out, record)
  print(json.dumps(record, indent=1))
  return record


if __name__ == "__main__":
  main()
