"""Tiny-ImageNet (200 classes, 64x64 RGB) from its standard folder layout.

The unzipped ``tiny-imagenet-200`` folder (from http://cs231n.stanford.edu/tiny-imagenet-200.zip)::

  wnids.txt                         the 200 WordNet ids, one per line
  train/<wnid>/images/*.JPEG        500 training images per class
  val/images/*.JPEG                 10,000 validation images
  val/val_annotations.txt           <file> TAB <wnid> TAB <x0> TAB <y0> TAB <x1> TAB <y1>

The label of a wnid is its index in the sorted list of ``wnids.txt`` (the order of the class folders
that torchvision's ImageFolder would give). The "test" split of this loader is the labelled
validation set (the official test images have no labels). Images are decoded with PIL in the
grain worker processes of ``pipeline.GrainBatches`` (one per CPU core by default), grey images are
converted to RGB, and every image is normalised with the ImageNet statistics. Training
augmentation: random crop 64 with 4-pixel zero padding and horizontal flip
(``images.crop_and_flip``, before normalisation).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.input.base import DataError
from experiments.input.imagenet import IMAGENET_MEAN, IMAGENET_STD
from experiments.input.images import crop_and_flip, draw_crop_flip, normalise
from experiments.input.pipeline import ExampleReader, GrainBatches, decoding_parallelism

TINY_IMAGENET_DIR = "~/data/tiny-imagenet-200"
"""Default folder of the unzipped dataset."""

SPLITS = ("train", "test")
IMAGE_SHAPE = (64, 64, 3)
CROP_PADDING = 4

_HOW_TO_GET = (
  "download http://cs231n.stanford.edu/tiny-imagenet-200.zip yourself, unzip it and "
  "pass the tiny-imagenet-200 folder as data_dir"
)


def read_wnids(root: Path) -> list[str]:
  """The sorted WordNet ids of ``root/wnids.txt``; label k is the k-th of them.

  Raises:
    DataError: missing file, or a file without ids or with repeated ids.
  """
  path = root / "wnids.txt"
  if not path.is_file():
    raise DataError(
      f"tiny_imagenet: no {path}; expected the tiny-imagenet-200 layout in {root} "
      f"(wnids.txt, train/<wnid>/images/, val/images/, val/val_annotations.txt); " + _HOW_TO_GET
    )
  wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not wnids or len(set(wnids)) != len(wnids):
    raise DataError(
      f"tiny_imagenet: {path} must list distinct WordNet ids, found {len(wnids)} "
      f"lines with {len(set(wnids))} distinct ids"
    )
  return sorted(wnids)


def list_split(root: Path, split: str, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
  """Image files and labels of one split, in a fixed order.

  Training files are listed class by class (sorted wnids), sorted by name within a class;
  validation files follow ``val_annotations.txt``.

  Returns:
    paths, and int32 labels [N].

  Raises:
    DataError: a missing class folder or annotation file, an annotation naming an unknown wnid
      or a missing image, or an empty split.
  """
  label_of = {wnid: k for k, wnid in enumerate(wnids)}
  paths: list[Path] = []
  labels: list[int] = []
  if split == "train":
    for wnid in wnids:
      folder = root / "train" / wnid / "images"
      if not folder.is_dir():
        raise DataError(
          f"tiny_imagenet: missing class folder {folder} (wnid listed in {root / 'wnids.txt'})"
        )
      names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpeg", ".jpg")))
      paths += [folder / n for n in names]
      labels += [label_of[wnid]] * len(names)
  else:
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
      raise DataError(f"tiny_imagenet: no {annotations}; " + _HOW_TO_GET)
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) < 2 or fields[1] not in label_of:
        raise DataError(
          f"tiny_imagenet: {annotations}:{number}: expected '<file>\\t<wnid>\\t...' "
          f"with a wnid of wnids.txt, found {line!r}"
        )
      path = root / "val" / "images" / fields[0]
      if not path.is_file():
        raise DataError(f"tiny_imagenet: {annotations}:{number} names {path}, which is missing")
      paths.append(path)
      labels.append(label_of[fields[1]])
  if not paths:
    raise DataError(f"tiny_imagenet: the {split!r} split in {root} has no images")
  return paths, np.asarray(labels, np.int32)


def read_image(path: Path) -> np.ndarray:
  """Decodes one image as uint8 RGB [64, 64, 3].

  Raises:
    DataError: an image of another size.
  """
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB"))
  if pixels.shape != IMAGE_SHAPE:
    raise DataError(f"tiny_imagenet: {path} has shape {pixels.shape}, expected {IMAGE_SHAPE}")
  return pixels


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
  """Tiny-ImageNet as the batches of one process (see the module docstring).

  Args:
    split: "train" (100,000 images) or "test" (the 10,000 labelled validation images).
    batch_size: global batch size, divisible by ``process_count``.
    train: training pipeline (shuffled, last batch dropped) or evaluation pipeline (stored
      order, last batch padded with ``PAD_LABEL``).
    seed: non-negative run seed.
    data_dir: the ``tiny-imagenet-200`` folder; None for ``TINY_IMAGENET_DIR``.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: random crop with 4-pixel zero padding and horizontal flip; None for on when
      training, off otherwise.
    num_workers: decoding worker processes; 0 or None (the default) for one thread per core in
      this process (``pipeline.decoding_parallelism``).

  Returns:
    A ``pipeline.GrainBatches`` with input shape [64, 64, 3] and 200 classes.

  Raises:
    DataError: unknown split, inconsistent arguments, or missing or malformed files (nothing is
      ever downloaded).
  """
  if split not in SPLITS:
    raise DataError(f"tiny_imagenet: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
  augment = train if augment is None else augment
  root = Path(data_dir if data_dir is not None else TINY_IMAGENET_DIR).expanduser()
  wnids = read_wnids(root)
  paths, labels = list_split(root, split, wnids)

  def example(index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    pixels = read_image(paths[index])
    if rng is not None:
      offsets, flips = draw_crop_flip(rng, 1, CROP_PADDING)
      pixels = crop_and_flip(pixels[None], offsets, flips, CROP_PADDING)[0]
    return normalise(pixels, IMAGENET_MEAN, IMAGENET_STD), int(labels[index])

  return GrainBatches(
    ExampleReader(example, len(paths), IMAGE_SHAPE),
    num_classes=len(wnids),
    batch_size=batch_size,
    train=train,
    seed=seed,
    augment=augment,
    process_index=process_index,
    process_count=process_count,
    **decoding_parallelism(num_workers),
  )
