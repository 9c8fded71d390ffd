"""CIFAR10-DVS: event recordings binned into T frames, cached once, read frame-by-frame afterwards.

The dataset (Li et al., 2017) is 10 x 1000 recordings of CIFAR-10 images moving on a screen, filmed
by a 128x128 DVS128 sensor, distributed as one zip per class of AEDAT files. Extract the zips into
one folder (``<events_dir>/<class>/*.aedat`` for the ten classes of ``CLASSES``), build the frame
cache once with :func:`build_frame_cache` (or ``python -m experiments.input.dvs --events_dir=...
--cache_dir=...``) and train from the cache; nothing is ever downloaded.

Frames of one recording of N events (in file order, which is time order):

1. slices: with d = floor(N / T), slice k in 0..T-2 holds events [k d, (k + 1) d) and slice T-1
   holds [(T-1) d, N) (equal event counts, the remainder in the last slice, as SpikingJelly's
   ``split_by="number"``);
2. counts: F[k, r, c, p] = number of events of slice k at pixel (r, c) with polarity p (channel 0:
   OFF, 1: ON), on the 128x128 grid; a sensor pixel (x from the left, y from the top) lands at
   r = 127 - x, c = y, a quarter turn that shows the recorded images upright (the orientation of
   SpikingJelly's frames, whose channels are ON, OFF instead);
3. resize: bilinear to 48x48 with half-pixel centres and no antialiasing, the convention of
   ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
   (:func:`resize_bilinear`).

Each example is time-major float32 [T, 48, 48, 2] (T = 10). Split: per class, the recordings in
natural name order are permuted by the seed sequence (SPLIT_SEED, class index) and the first
floor(9 n / 10) of them are the training set, the others the test set. Training augmentation
(optional): horizontal flip with probability 1/2 and a circular shift by up to ``MAX_SHIFT``
pixels along each spatial axis, the same for all T frames (as in the TET code base).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from experiments.files import atomic_file
from experiments.input.base import DataError
from experiments.input.pipeline import ExampleReader, GrainBatches

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SENSOR_SIZE = 128
TIME_STEPS = 10
FRAME_SIZE = 48
SPLIT_SEED = 0
"""Seed of the per-class 9:1 train/test split: a fixed property of the dataset, not of a run."""
MAX_SHIFT = 5

CIFAR10_DVS_CACHE_DIR = "~/data/cifar10_dvs/frames"
"""Default folder of the frame cache."""

SPLITS = ("train", "test")
_CACHE_INFO = "cache.json"
_POLARITY_EVENT = 1  # AEDAT 3.1 event type of polarity events
_PACKET_HEADER = struct.Struct("<hhiiiiii")


class Events(NamedTuple):
  """Events of one recording, in time order.

  Attributes:
    t: int64 timestamps in microseconds.
    x: int64 column, counted from the left of the sensor.
    y: int64 row, counted from the top of the sensor.
    polarity: int64, 1 for ON (brighter), 0 for OFF.
  """

  t: np.ndarray
  x: np.ndarray
  y: np.ndarray
  polarity: np.ndarray


def _header_end(data: bytes) -> int:
  """Offset of the first byte after the header: the '#' lines, up to '#!END-HEADER' if present."""
  offset = 0
  while data.startswith(b"#", offset):
    newline = data.find(b"\n", offset)
    if newline < 0:
      return len(data)
    line = data[offset:newline].strip()
    offset = newline + 1
    if line == b"#!END-HEADER":
      break
  return offset


def _read_aedat2(data: bytes, offset: int, path: Path) -> Events:
  """DVS128 events of AEDAT 2.0: big-endian (uint32 address, int32 timestamp) pairs.

  Address bits: 0 polarity (1 ON), 1-7 x, 8-14 y with the origin at the lower left, 15 external
  event (such events are dropped).
  """
  payload = len(data) - offset
  if payload % 8:
    raise DataError(f"{path}: {payload} bytes of events, not a whole number of 8-byte events")
  pairs = np.frombuffer(data, ">u4", offset=offset).reshape(-1, 2).astype(np.int64)
  address, t = pairs[:, 0], pairs[:, 1]
  keep = (address >> 15) & 1 == 0
  address, t = address[keep], t[keep]
  y_up = (address >> 8) & 0x7F
  return Events(t, (address >> 1) & 0x7F, SENSOR_SIZE - 1 - y_up, address & 1)


def _read_aedat31(data: bytes, offset: int, path: Path) -> Events:
  """Polarity events of AEDAT 3.1: little-endian packets of a 28-byte header and the events.

  Header: int16 type, int16 source, int32 event size, int32 timestamp offset, int32 timestamp
  overflow, int32 capacity, int32 number of events, int32 number of valid events; the packet holds
  ``number`` events. Polarity event (type 1): uint32 data (bit 0 valid, 1 polarity, 2-16 y, 17-31
  x, origin at the upper left), int32 timestamp, extended by the packet's timestamp overflow
  (t + overflow 2^31). Packets of other types and invalid events are skipped.
  """
  parts = []
  while offset < len(data):
    if len(data) - offset < _PACKET_HEADER.size:
      raise DataError(f"{path}: truncated packet header at byte {offset}")
    kind, _, size, _, overflow, _, number, _ = _PACKET_HEADER.unpack_from(data, offset)
    offset += _PACKET_HEADER.size
    length = size * number
    if size <= 0 or number < 0 or offset + length > len(data):
      raise DataError(
        f"{path}: packet of {number} events of {size} bytes at byte "
        f"{offset - _PACKET_HEADER.size} does not fit in the file"
      )
    if kind == _POLARITY_EVENT:
      if size != 8:
        raise DataError(f"{path}: polarity events of {size} bytes, expected 8")
      words = np.frombuffer(data, "<u4", count=2 * number, offset=offset).reshape(-1, 2)
      words = words.astype(np.int64)
      word = words[:, 0]
      keep = word & 1 == 1
      t = (words[:, 1] + (overflow << 31))[keep]
      word = word[keep]
      parts.append((t, (word >> 17) & 0x7FFF, (word >> 2) & 0x7FFF, (word >> 1) & 1))
    offset += length
  if not parts:
    raise DataError(f"{path}: no polarity event packets")
  return Events(*(np.concatenate(field) for field in zip(*parts)))


def read_aedat(path: str | os.PathLike) -> Events:
  """Reads the polarity events of an AEDAT 2.0 (DVS128) or AEDAT 3.1 file.

  The version is taken from the first header line ('#!AER-DAT2.0' or '#!AER-DAT3.1'); sensor
  coordinates are returned with the origin at the upper left whatever the version.

  Raises:
    DataError: a missing file, another AEDAT version, or a malformed body.
  """
  path = Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise DataError(f"{path}: no such file") from e
  first_line = data[: data.find(b"\n")].strip() if b"\n" in data else b""
  readers = {b"#!AER-DAT2.0": _read_aedat2, b"#!AER-DAT3.1": _read_aedat31}
  if first_line not in readers:
    raise DataError(
      f"{path}: first line {first_line[:20]!r} is not an AEDAT 2.0 or 3.1 version line"
    )
  return readers[first_line](data, _header_end(data), path)


def event_frames(
  events: Events, time_steps: int = TIME_STEPS, size: int = SENSOR_SIZE
) -> np.ndarray:
  """Bins events into ``time_steps`` slices of equal event count and counts them per pixel.

  Slices and counts as in the module docstring (steps 1 and 2).

  Args:
    events: one recording.
    time_steps: number of slices T.
    size: side of the sensor grid.

  Returns:
    float32 [T, size, size, 2] event counts.

  Raises:
    DataError: no events, a coordinate outside the grid, or a polarity other than 0 and 1.
  """
  count = events.t.size
  if count == 0:
    raise DataError("the recording has no events")
  if min(events.x.min(), events.y.min()) < 0 or max(events.x.max(), events.y.max()) >= size:
    raise DataError(
      f"event coordinates span x [{events.x.min()}, {events.x.max()}], y "
      f"[{events.y.min()}, {events.y.max()}], outside the {size}x{size} sensor"
    )
  if not np.isin(events.polarity, (0, 1)).all():
    raise DataError(f"polarities {np.unique(events.polarity)} are not all 0 or 1")
  per_slice = count // time_steps
  slice_of = np.searchsorted(per_slice * np.arange(1, time_steps), np.arange(count), side="right")
  row, col = size - 1 - events.x, events.y
  flat = ((slice_of * size + row) * size + col) * 2 + events.polarity
  counts = np.bincount(flat, minlength=time_steps * size * size * 2)
  return counts.reshape(time_steps, size, size, 2).astype(np.float32)


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D linear interpolation with half-pixel centres."""
  source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = source - low
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), high), frac)
  return matrix


def resize_bilinear(frames: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [..., H, W, C] to [..., size, size, C], without antialiasing.

  Output pixel i along an axis of length n reads the input at s = max((i + 1/2) n / size - 1/2, 0)
  and mixes pixels floor(s) and floor(s) + 1 (clamped to the edge) with weights 1 - frac(s) and
  frac(s), separably along rows and columns.
  """
  rows = _interpolation_matrix(frames.shape[-3], size)
  cols = _interpolation_matrix(frames.shape[-2], size)
  out = np.einsum("ph,...hwc->...pwc", rows, frames.astype(np.float64))
  out = np.einsum("qw,...pwc->...pqc", cols, out)
  return out.astype(np.float32)


def recording_frames(
  path: str | os.PathLike, time_steps: int = TIME_STEPS, size: int = FRAME_SIZE
) -> np.ndarray:
  """The cached form of one recording: float32 [T, size, size, 2] (module docstring, steps 1-3)."""
  events = read_aedat(path)
  try:
    frames = event_frames(events, time_steps)
  except DataError as e:
    raise DataError(f"{path}: {e}") from e
  return resize_bilinear(frames, size)


def _natural_key(name: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def split_names(names: Sequence[str], class_index: int, split: str) -> list[str]:
  """The recordings of one class that belong to ``split`` (see the module docstring), in order.

  Args:
    names: file names of the class's recordings (any order).
    class_index: position of the class in ``CLASSES``.
    split: "train" or "test".

  Returns:
    The names of the split, in natural order.
  """
  ordered = sorted(names, key=_natural_key)
  rng = np.random.default_rng(np.random.SeedSequence((SPLIT_SEED, class_index)))
  chosen = rng.permutation(len(ordered))
  cut = (9 * len(ordered)) // 10
  keep = np.sort(chosen[:cut] if split == "train" else chosen[cut:])
  return [ordered[i] for i in keep]


def _class_folders(root: Path, suffix: str, what: str) -> dict[str, list[str]]:
  folders = {}
  for name in CLASSES:
    folder = root / name
    files = sorted(f for f in os.listdir(folder) if f.endswith(suffix)) if folder.is_dir() else []
    if not files:
      raise DataError(
        f"cifar10_dvs: no {suffix} files in {folder}; {what} needs one folder per "
        f"class ({', '.join(CLASSES)})"
      )
    folders[name] = files
  return folders


def build_frame_cache(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  *,
  time_steps: int = TIME_STEPS,
  size: int = FRAME_SIZE,
  num_threads: int | None = None,
) -> int:
  """Converts every recording of ``src`` to frames, one ``.npz`` per recording in ``dst``.

  Writes ``dst/<class>/<name>.npz`` (key "frames", float32 [T, size, size, 2], see
  :func:`recording_frames`) and, last, ``dst/cache.json`` recording T and size. Each file is
  written under a temporary name and renamed, so an interrupted build leaves no partial file;
  running it again converts only the missing recordings.

  Args:
    src: folder with one subfolder of ``.aedat`` files per class of ``CLASSES``.
    dst: cache folder (created if needed).
    time_steps: frames per recording T.
    size: side of the resized frames.
    num_threads: conversion threads (default: the CPU count).

  Returns:
    The number of recordings in the cache.

  Raises:
    DataError: a missing class folder, an unreadable recording, or a cache in ``dst`` built with
      another T or size.
  """
  src, dst = Path(src).expanduser(), Path(dst).expanduser()
  info_path = dst / _CACHE_INFO
  info = {"time_steps": time_steps, "size": size}
  if info_path.is_file():
    found = json.loads(info_path.read_text())
    if {k: found.get(k) for k in info} != info:
      raise DataError(
        f"cifar10_dvs: {info_path} describes {found}, not {info}; use another cache folder"
      )
  folders = _class_folders(src, ".aedat", "the event folder")

  def convert(name: str, file: str) -> None:
    target = dst / name / (Path(file).stem + ".npz")
    if target.exists():
      return
    frames = recording_frames(src / name / file, time_steps, size)
    with atomic_file(target, "wb") as f:
      np.savez(f, frames=frames)

  for name in CLASSES:
    (dst / name).mkdir(parents=True, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
    jobs = [pool.submit(convert, name, file) for name, files in folders.items() for file in files]
    for job in jobs:
      job.result()
  info["recordings"] = len(jobs)
  info_path.write_text(json.dumps(info, indent=2) + "\n")
  return len(jobs)


def shift_and_flip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Training augmentation of one example [T, H, W, C]: flip, then circular shift.

  With f ~ Bernoulli(1/2) and (a, b) uniform in {-MAX_SHIFT, ..., MAX_SHIFT}^2:
  out[t, i, j] = G[t, (i - a) mod H, (j - b) mod W], G = frames flipped along W if f else frames.
  """
  if rng.random() < 0.5:
    frames = frames[:, :, ::-1]
  shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
  return np.roll(frames, tuple(int(s) for s in shift), axis=(1, 2))


def load(
  split: str,
  *,
  batch_size: int,
  train: bool,
  seed: int,
  data_dir: str | None = None,
  process_index: int = 0,
  process_count: int = 1,
  augment: bool | None = None,
  num_workers: int | None = None,
) -> GrainBatches:
  """CIFAR10-DVS frames from the cache as the batches of one process (see the module docstring).

  Args:
    split: "train" (9,000 recordings) or "test" (1,000).
    batch_size: global batch size, divisible by ``process_count``.
    train: training pipeline (shuffled, last batch dropped) or evaluation pipeline (stored
      order, last batch padded with ``PAD_LABEL``).
    seed: non-negative run seed.
    data_dir: the frame cache of :func:`build_frame_cache`; None for ``CIFAR10_DVS_CACHE_DIR``.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: flip and shift (:func:`shift_and_flip`); None for off.
    num_workers: worker processes reading the cache; None for 0 (one thread of this process:
      reading a cached recording is a file read, with no decoding to spread over processes).

  Returns:
    A ``pipeline.GrainBatches`` of time-major examples [T, 48, 48, 2] and 10 classes.

  Raises:
    DataError: unknown split, inconsistent arguments, or no complete cache (the message says how
      to build it).
  """
  if split not in SPLITS:
    raise DataError(f"cifar10_dvs: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
  root = Path(data_dir if data_dir is not None else CIFAR10_DVS_CACHE_DIR).expanduser()
  info_path = root / _CACHE_INFO
  if not info_path.is_file():
    raise DataError(
      f"cifar10_dvs: no frame cache in {root} (no {_CACHE_INFO}); build it once from "
      f"the extracted .aedat files with `python -m experiments.input.dvs "
      f"--events_dir=<folder of the class folders> --cache_dir={root}`"
    )
  info = json.loads(info_path.read_text())
  shape = (info["time_steps"], info["size"], info["size"], 2)
  folders = _class_folders(root, ".npz", "the frame cache")
  paths, labels = [], []
  for label, name in enumerate(CLASSES):
    chosen = split_names(folders[name], label, split)
    paths += [root / name / file for file in chosen]
    labels += [label] * len(chosen)

  def example(index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    with np.load(paths[index]) as archive:
      frames = archive["frames"]
    if frames.shape != shape:
      raise DataError(
        f"cifar10_dvs: {paths[index]} holds frames of shape {frames.shape}, expected {shape}"
      )
    return (frames if rng is None else shift_and_flip(frames, rng)), labels[index]

  return GrainBatches(
    ExampleReader(example, len(paths), shape),
    num_classes=len(CLASSES),
    batch_size=batch_size,
    train=train,
    seed=seed,
    augment=bool(augment),
    time_major=True,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers or 0,
  )


def main(argv: Sequence[str] | None = None) -> None:
  """Builds the frame cache from the command line."""
  parser = argparse.ArgumentParser(
    description="Builds the CIFAR10-DVS frame cache from the extracted .aedat files."
  )
  parser.add_argument(
    "--events_dir", required=True, help="folder with one subfolder of .aedat files per class"
  )
  parser.add_argument("--cache_dir", default=CIFAR10_DVS_CACHE_DIR, help="frame cache folder")
  parser.add_argument("--time_steps", type=int, default=TIME_STEPS)
  parser.add_argument("--size", type=int, default=FRAME_SIZE)
  args = parser.parse_args(argv)
  count = build_frame_cache(
    args.events_dir, args.cache_dir, time_steps=args.time_steps, size=args.size
  )
  print(f"{count} recordings cached in {Path(args.cache_dir).expanduser()}")


if __name__ == "__main__":
  main()
