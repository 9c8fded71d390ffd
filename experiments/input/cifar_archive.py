"""CIFAR-10/100 from the official python-format archives, prepared once into a folder of arrays.

The official archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``) hold pickled
dicts: ``b"data"`` uint8 [N, 3072], each row one image as its 1024 red, 1024 green and 1024 blue
pixels in row-major order (CHW), and the labels under ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100). ``prepare`` converts them with numpy and the standard library
(no TensorFlow) into ``<data_dir>/<name>_npy/``::

    train_images.npy  uint8 [N, 32, 32, 3] (NHWC)    train_labels.npy  int32 [N]
    test_images.npy   uint8 [M, 32, 32, 3]           test_labels.npy   int32 [M]
    manifest.json     format, dataset, the archive's MD5, size and SHA-256 of every file above

The archive is taken from, in this order: ``<data_dir>/<archive>``,
``<data_dir>/downloads/manual/<archive>`` (tensorflow-datasets' manual folder), else downloaded
from ``ARCHIVES[name].url`` (one try; no answer within ``CONNECT_SECONDS`` counts as offline).
Its MD5 must be the one of ``ARCHIVES[name].md5`` before anything in it is unpickled. A
downloaded archive is deleted once converted; a local one is left where it is.

Interrupted preparations: the arrays are written into ``<data_dir>/.<name>_npy.tmp-<pid>``, the
manifest last, then the folder is renamed to ``<name>_npy``; only a folder under that name with a
manifest counts as prepared, so a killed preparation leaves at most a temporary folder, which the
next preparation removes. Reading checks every file against the manifest.

Several processes (the processes of a multi-host run sharing one data folder, or two runs started
together): the one that holds the lock ``<data_dir>/.<name>_npy.lock`` (``filelock``: an ``flock``
that the kernel releases when its holder dies) prepares; the others wait for it, at most
``WAIT_SECONDS``, and then read the finished folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import pickle
import shutil
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import filelock
import numpy as np

from experiments.input.base import DataError

FORMAT = 1
"""Version of the prepared folder's layout, stored in its manifest."""

CONNECT_SECONDS = 5.0
"""Longest wait for the download host to answer (name lookup and connection) before the machine
counts as offline."""

READ_SECONDS = 60.0
"""Longest pause within a running download before it is abandoned."""

WAIT_SECONDS = 1800.0
"""Longest wait for another process that prepares the same folder (download and conversion)."""

OFFLINE_CONFIGS = ("experiments/configs/digits.py", "experiments/configs/fashion_mnist.py")


@dataclasses.dataclass(frozen=True)
class Archive:
  """One official python-format archive.

  Attributes:
    filename: the archive's file name.
    url: where it is downloaded from.
    md5: its MD5 digest (hex), as published with it.
    size: its size in bytes (for the progress bar when the server sends none).
    splits: split name -> the archive members (pickled dicts) it is made of, in order.
    label_key: the dict key of the labels.
  """

  filename: str
  url: str
  md5: str
  size: int
  splits: dict[str, tuple[str, ...]]
  label_key: bytes


ARCHIVES: dict[str, Archive] = {
  "cifar10": Archive(
    filename="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    size=170_498_071,
    splits={
      "train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
      "test": ("cifar-10-batches-py/test_batch",),
    },
    label_key=b"labels",
  ),
  "cifar100": Archive(
    filename="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    size=169_001_437,
    splits={"train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)},
    label_key=b"fine_labels",
  ),
}

_IMAGE_SHAPE = (32, 32, 3)


def prepared_folder(name: str, data_dir: Path) -> Path:
  """The prepared folder of ``name`` in ``data_dir``, whether it exists or not."""
  return Path(data_dir) / f"{name}_npy"


def is_prepared(name: str, data_dir: Path) -> bool:
  """Whether ``data_dir`` holds a finished preparation of ``name`` (its folder and manifest)."""
  return (prepared_folder(name, data_dir) / "manifest.json").is_file()


def local_archive(name: str, data_dir: Path) -> Path | None:
  """The local copy of ``name``'s archive in ``data_dir`` or its ``downloads/manual/``, if any."""
  filename = ARCHIVES[name].filename
  for path in (Path(data_dir) / filename, Path(data_dir) / "downloads" / "manual" / filename):
    if path.is_file():
      return path
  return None


# --------------------------------------------------------------------------------------------------
# Reading.


def _file_digest(path: Path, algorithm: str) -> str:
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def read_prepared(name: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of a prepared folder after checking its files against the manifest.

  Returns:
    images uint8 [N, 32, 32, 3] and labels int32 [N], in the archive's order.

  Raises:
    DataError: no finished preparation, a manifest of another format or dataset, or a file whose
      size or SHA-256 differs from the manifest's (the message says how to prepare it again).
  """
  folder = prepared_folder(name, data_dir)
  again = f"delete {folder} and rerun to prepare it again"
  try:
    manifest = json.loads((folder / "manifest.json").read_text())
  except FileNotFoundError as e:
    raise DataError(f"{name}: {folder} is not prepared (no manifest.json)") from e
  except (OSError, ValueError) as e:
    raise DataError(f"{name}: unreadable {folder / 'manifest.json'} ({e}); {again}") from e
  if manifest.get("format") != FORMAT or manifest.get("dataset") != name:
    raise DataError(
      f"{name}: {folder} holds format {manifest.get('format')} of "
      f"{manifest.get('dataset')!r}, expected format {FORMAT} of {name!r}; {again}"
    )
  arrays = []
  for kind in ("images", "labels"):
    filename = f"{split}_{kind}.npy"
    path = folder / filename
    expected = manifest.get("files", {}).get(filename)
    if expected is None:
      raise DataError(f"{name}: no split {split!r} in {folder}")
    if not path.is_file() or path.stat().st_size != expected["bytes"]:
      size = path.stat().st_size if path.is_file() else "no"
      raise DataError(f"{name}: {path} has {size} bytes, the manifest {expected['bytes']}; {again}")
    if _file_digest(path, "sha256") != expected["sha256"]:
      raise DataError(f"{name}: {path} does not match its SHA-256 in the manifest; {again}")
    arrays.append(np.load(path, allow_pickle=False))
  return arrays[0], arrays[1]


# --------------------------------------------------------------------------------------------------
# Download.


def _open_url(url: str) -> http.client.HTTPResponse:
  """Opens ``url``; gives up after ``CONNECT_SECONDS`` without an answer.

  The connection is made on a helper thread so that the bound covers the name lookup too, which
  socket timeouts do not; reads then time out after ``READ_SECONDS`` of silence.

  Raises:
    OSError: the host did not answer in time, refused, or answered with an HTTP error.
  """
  result: dict[str, object] = {}

  def connect() -> None:
    try:
      result["response"] = urllib.request.urlopen(url, timeout=READ_SECONDS)
    except (OSError, http.client.HTTPException) as e:
      result["error"] = e

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(CONNECT_SECONDS)
  if thread.is_alive():
    raise TimeoutError(f"no answer within {CONNECT_SECONDS:g} s")
  if "error" in result:
    error = result["error"]
    raise error if isinstance(error, OSError) else OSError(str(error))
  return result["response"]


def _offline_message(name: str, data_dir: Path, reason: str) -> str:
  archive = ARCHIVES[name]
  host = urllib.parse.urlparse(archive.url).hostname
  return (
    f"{name}: no prepared data in {data_dir} and the download host {host} cannot be reached "
    f"({reason}); looked in {data_dir} for {prepared_folder(name, data_dir).name}/, "
    f"{name}/<version>/ (tensorflow-datasets array_record) and the archive "
    f"{archive.filename} (md5 {archive.md5}, also accepted in "
    f"{Path(data_dir) / 'downloads' / 'manual'}/): copy the archive there and rerun; "
    f"configs that run offline now: {', '.join(OFFLINE_CONFIGS)}"
  )


def _download(response: http.client.HTTPResponse, archive: Archive, destination: Path) -> str:
  """Streams ``response`` into ``destination`` with a progress bar; returns the MD5 (hex)."""
  import tqdm

  length = response.headers.get("Content-Length")
  digest = hashlib.md5()
  with (
    open(destination, "wb") as out,
    tqdm.tqdm(
      total=int(length) if length else archive.size,
      unit="B",
      unit_scale=True,
      desc=f"downloading {archive.filename}",
      file=sys.stderr,
      mininterval=1.0,
    ) as bar,
  ):
    while chunk := response.read(1 << 20):
      digest.update(chunk)
      out.write(chunk)
      bar.update(len(chunk))
  return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Conversion.


def _split_arrays(
  members: dict[str, dict], archive: Archive, split: str
) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for member in archive.splits[split]:
    if member not in members:
      raise DataError(f"{archive.filename}: no member {member}")
    batch = members[member]
    data = np.asarray(batch.get(b"data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(_IMAGE_SHAPE)):
      raise DataError(
        f"{archive.filename}: {member} holds data {data.dtype} {data.shape}, "
        f"expected uint8 [N, {int(np.prod(_IMAGE_SHAPE))}]"
      )
    label = np.asarray(batch.get(archive.label_key, []), np.int32)
    if label.shape != (data.shape[0],):
      raise DataError(
        f"{archive.filename}: {member} has {data.shape[0]} images but "
        f"{label.size} {archive.label_key.decode()}"
      )
    # Row layout [3, 32, 32] (channel, row, column) -> [32, 32, 3].
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(label)
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _write_synced(path: Path, array: np.ndarray) -> dict[str, object]:
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  return {"bytes": path.stat().st_size, "sha256": _file_digest(path, "sha256")}


def convert(name: str, archive_path: Path, folder: Path, md5: str) -> None:
  """Writes the arrays and the manifest of ``name`` from a verified archive into ``folder``.

  The archive is unpickled, so it must have been checked against the official MD5 before.

  Raises:
    DataError: a member missing from the archive, or data of another shape than CIFAR's.
  """
  archive = ARCHIVES[name]
  wanted = {member for members in archive.splits.values() for member in members}
  members = {}
  try:
    with tarfile.open(archive_path, "r:gz") as tar:
      for member in tar:
        if member.name in wanted:
          members[member.name] = pickle.load(tar.extractfile(member), encoding="bytes")
  except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as e:
    raise DataError(f"{archive_path}: not a readable CIFAR archive ({e})") from e
  files = {}
  for split in archive.splits:
    images, labels = _split_arrays(members, archive, split)
    files[f"{split}_images.npy"] = _write_synced(folder / f"{split}_images.npy", images)
    files[f"{split}_labels.npy"] = _write_synced(folder / f"{split}_labels.npy", labels)
  manifest = {
    "format": FORMAT,
    "dataset": name,
    "archive": archive.filename,
    "archive_md5": md5,
    "files": files,
  }
  with open(folder / "manifest.json", "w") as f:
    json.dump(manifest, f, indent=2)
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# Preparation.


def _checked_local_archive(name: str, path: Path) -> Path:
  archive = ARCHIVES[name]
  md5 = _file_digest(path, "md5")
  if md5 != archive.md5:
    raise DataError(
      f"{name}: {path} has md5 {md5}, not the official archive's {archive.md5} "
      f"(damaged or another file); replace it with the official {archive.filename} "
      f"or remove it"
    )
  return path


def prepare(name: str, data_dir: str | os.PathLike) -> Path:
  """Prepares ``name`` in ``data_dir`` unless done already; returns the prepared folder.

  Raises:
    DataError: no local archive and no answer from the download host (nothing is written), an
      archive whose MD5 is not the official one, a damaged download, or a wait for another
      process preparing the same folder longer than ``WAIT_SECONDS``.
  """
  if name not in ARCHIVES:
    raise DataError(f"unknown CIFAR dataset {name!r}; allowed: {', '.join(ARCHIVES)}")
  data_dir = Path(data_dir)
  folder = prepared_folder(name, data_dir)
  if is_prepared(name, data_dir):
    return folder
  archive = ARCHIVES[name]
  if local_archive(name, data_dir) is None:
    try:
      _open_url(archive.url).close()
    except OSError as e:
      raise DataError(_offline_message(name, data_dir, str(e))) from e
  lock = filelock.FileLock(data_dir / f".{folder.name}.lock")
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire(timeout=0)
    except filelock.Timeout:
      print(
        f"{name}: another process is preparing {folder}; waiting for it (at most "
        f"{WAIT_SECONDS:g} s)",
        flush=True,
      )
      lock.acquire(timeout=WAIT_SECONDS, poll_interval=0.5)
  except filelock.Timeout as e:  # a TimeoutError, hence before OSError
    raise DataError(
      f"{name}: waited {WAIT_SECONDS:g} s for the process holding "
      f"{lock.lock_file} to prepare {folder}; rerun when it has finished"
    ) from e
  except OSError as e:
    raise DataError(f"{name}: cannot write the prepared data into {data_dir} ({e})") from e
  try:
    if not is_prepared(name, data_dir):  # else another process finished it while this one waited
      _prepare_locked(name, data_dir, folder)
  finally:
    lock.release()
  return folder


def _prepare_locked(name: str, data_dir: Path, folder: Path) -> None:
  archive = ARCHIVES[name]
  for leftover in data_dir.glob(f".{folder.name}.tmp-*"):  # of killed preparations
    shutil.rmtree(leftover, ignore_errors=True)
  temporary = data_dir / f".{folder.name}.tmp-{os.getpid()}"
  temporary.mkdir()
  start = time.perf_counter()
  try:
    source = local_archive(name, data_dir)
    if source is not None:
      print(f"{name}: preparing {folder} from {source}", flush=True)
      source = _checked_local_archive(name, source)
    else:
      print(
        f"{name}: downloading {archive.url} ({archive.size / 1e6:.0f} MB) to prepare {folder}",
        flush=True,
      )
      source = temporary / archive.filename
      try:
        with _open_url(archive.url) as response:
          md5 = _download(response, archive, source)
      except (OSError, http.client.HTTPException) as e:
        raise DataError(
          f"{name}: the download of {archive.url} failed ({e}); rerun to try "
          f"again, or copy {archive.filename} into {data_dir}"
        ) from e
      if md5 != archive.md5:
        raise DataError(
          f"{name}: the downloaded {archive.filename} has md5 {md5}, not the "
          f"official {archive.md5} (damaged in transfer); rerun to try again"
        )
    convert(name, source, temporary, archive.md5)
    if source.parent == temporary:
      source.unlink()
    os.rename(temporary, folder)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
      os.fsync(directory)
    finally:
      os.close(directory)
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  print(f"{name}: prepared {folder} in {time.perf_counter() - start:.1f} s", flush=True)
