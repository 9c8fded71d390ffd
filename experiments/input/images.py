"""Static-image datasets held in memory: scikit-learn digits, Fashion-MNIST, CIFAR-10 and CIFAR-100.

Readers return uint8 images [N, H, W, C] and int32 labels [N] after checking them. ``ArrayReader``
reads examples of such arrays for ``pipeline.GrainBatches``, which orders, shards and pads them
(shuffled per epoch for training, the stored order for evaluation; ``experiments.input.pipeline``):

* augmentation (training only): random crop with zero padding and horizontal flip, drawn for each
  example from its own generator (seed, epoch, example index), so an example is augmented
  identically whatever the number of processes and whether or not the epoch was resumed;
* normalisation: x' = (x / 255 - mu_c) / sigma_c per channel c, with constants fixed per dataset.

Where the data lies:

* digits: bundled with scikit-learn (``sklearn.datasets.load_digits``); ``data_dir`` is unused.
* Fashion-MNIST: the four gzipped IDX files of the Debian package ``dataset-fashion-mnist``, by
  default in ``/usr/share/datasets/fashion-mnist``.
* CIFAR-10/100: in ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``: the
  folder ``<name>_npy/`` that ``cifar_archive.prepare`` writes from the official archive (on first
  use, or with ``python -m experiments.prepare_cifar``), else tensorflow-datasets ``array_record``
  data prepared before, read through ``tfds.data_source`` (random access, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from experiments.input import cifar_archive
from experiments.input.base import DataError
from experiments.input.pipeline import GrainBatches

DIGITS_SPLIT_SEED = 0
"""Seed of the stratified 80/20 split of scikit-learn's digits: a fixed property of the dataset,
independent of the run's seed."""

DIGITS_TEST_FRACTION = 0.2

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08


class ImageArrays(NamedTuple):
  """One split in memory: images uint8 [N, H, W, C], labels int32 [N]."""

  images: np.ndarray
  labels: np.ndarray


def check_image_arrays(
  name: str,
  split: str,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  image_shape: tuple[int, int, int],
  num_classes: int,
) -> ImageArrays:
  """Checks a split's arrays and returns them as uint8 images and int32 labels.

  Raises:
    DataError: empty split, image shape other than ``image_shape``, non-uint8 images, image and
      label counts that differ, or a label outside [0, num_classes).
  """
  where = f"{name} {split!r}"
  if images.ndim != 4 or images.shape[1:] != tuple(image_shape):
    raise DataError(
      f"{where}: images have shape {images.shape}, expected [N, {', '.join(map(str, image_shape))}]"
    )
  if images.dtype != np.uint8:
    raise DataError(f"{where}: images have dtype {images.dtype}, expected uint8")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise DataError(f"{where}: {images.shape[0]} images but labels of shape {labels.shape}")
  if images.shape[0] == 0:
    raise DataError(f"{where}: the split is empty")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{where}: labels have dtype {labels.dtype}, expected integers")
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= num_classes:
    raise DataError(f"{where}: labels span [{low}, {high}], expected [0, {num_classes})")
  return ImageArrays(images, labels.astype(np.int32))


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
  if split not in allowed:
    raise DataError(f"{name}: unknown split {split!r}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------------
# Readers.


def read_digits(split: str) -> ImageArrays:
  """Reads scikit-learn's 8x8 digits (1,797 images, 10 classes) and returns one split.

  The split is stratified 80/20 (``train_test_split`` with ``random_state=DIGITS_SPLIT_SEED``):
  1,437 training and 360 test images. Pixel values v in 0..16 become round(255 v / 16) in 0..255.

  Args:
    split: "train" or "test".

  Returns:
    images uint8 [N, 8, 8, 1] and labels int32 [N].
  """
  _check_split("digits", split, ("train", "test"))
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train_x, test_x, train_y, test_y = train_test_split(
    images,
    digits.target,
    test_size=DIGITS_TEST_FRACTION,
    stratify=digits.target,
    random_state=DIGITS_SPLIT_SEED,
  )
  images, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
  return check_image_arrays("digits", split, images, labels, image_shape=(8, 8, 1), num_classes=10)


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes (the MNIST file format).

  Layout: magic = 0x00 0x00 0x08 ndim, then ndim big-endian uint32 sizes, then prod(sizes) bytes.

  Args:
    path: the ``.gz`` file.
    ndim: the number of dimensions the file must have (3 for images, 1 for labels).

  Returns:
    uint8 array of the stored sizes.

  Raises:
    DataError: missing file, broken gzip stream, wrong magic number or dimension count, or a
      payload whose length is not the product of the sizes (truncated or with trailing bytes).
  """
  path = Path(path)
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise DataError(f"{path}: no such file") from e
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: not a complete gzip file ({e})") from e
  if len(data) < 4:
    raise DataError(f"{path}: {len(data)} bytes, shorter than the 4-byte IDX magic number")
  magic = struct.unpack(">I", data[:4])[0]
  expected_magic = (_IDX_UBYTE << 8) | ndim
  if magic != expected_magic:
    raise DataError(
      f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
      f"(unsigned bytes, {ndim} dimensions)"
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
  sizes = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(sizes, dtype=np.int64))
  payload = len(data) - header
  if payload != expected:
    problem = "truncated" if payload < expected else "trailing bytes"
    raise DataError(f"{path}: {problem}: sizes {sizes} need {expected} bytes, found {payload}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(sizes)


def read_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> ImageArrays:
  """Reads one split of Fashion-MNIST (60,000 train / 10,000 test 28x28 images, 10 classes).

  Args:
    split: "train" or "test".
    data_dir: folder of the four ``*-idx?-ubyte.gz`` files; None for ``FASHION_MNIST_DIR``.

  Returns:
    images uint8 [N, 28, 28, 1] and labels int32 [N].

  Raises:
    DataError: missing files (the message says where it looked and how to install them), or
      malformed, truncated or inconsistent files.
  """
  _check_split("fashion_mnist", split, tuple(_FASHION_MNIST_FILES))
  root = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
  image_file, label_file = (root / f for f in _FASHION_MNIST_FILES[split])
  missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
  if missing:
    raise DataError(
      f"fashion_mnist: missing {', '.join(missing)}; looked in {root}; install with "
      f"`apt-get install dataset-fashion-mnist` or pass data_dir"
    )
  images = read_idx(image_file, ndim=3)
  labels = read_idx(label_file, ndim=1)
  return check_image_arrays(
    "fashion_mnist", split, images[..., None], labels, image_shape=(28, 28, 1), num_classes=10
  )


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """CIFAR's data folder: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return Path(data_dir).expanduser()


def _prepare_hint(name: str, root: Path) -> str:
  return (
    f"prepare it once from the official archive: python -m experiments.prepare_cifar "
    f"--data_dir={root} --datasets={name}"
  )


def read_tfds_images(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  image_shape: tuple[int, int, int],
  num_classes: int,
) -> ImageArrays:
  """Reads a prepared tensorflow-datasets image dataset through ``tfds.data_source``.

  The prepared folder ``<data_dir>/<name>/<version>/`` is checked before tfds is asked for
  anything, so missing data fails at once and never enters tfds' download logic.

  Args:
    name: tfds name, e.g. "cifar10".
    split: tfds split name with ``array_record`` files, e.g. "train".
    data_dir: tfds data folder (see ``tfds_data_dir``).
    image_shape: expected [H, W, C] of every image.
    num_classes: labels must lie in [0, num_classes).

  Returns:
    images uint8 [N, H, W, C] and labels int32 [N], in the stored order.

  Raises:
    DataError: no prepared data, a version other than the installed tfds reads, data not in the
      ``array_record`` format, a missing split, or images or labels that fail the checks.
  """
  root = tfds_data_dir(data_dir)
  dataset_dir = root / name
  where = f"looked in {dataset_dir} (data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets)"
  found = sorted(p.parent.name for p in dataset_dir.glob("*/dataset_info.json"))
  if not found:
    raise DataError(f"{name}: no prepared dataset; {where}; {_prepare_hint(name, root)}")
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(
      f"{name}: reading tfds data needs tensorflow-datasets and importlib_resources: "
      f"pip install 'empf_jax[experiments]' ({e})"
    ) from e
  version = str(tfds.builder_cls(name).VERSION)
  prepared = dataset_dir / version
  if version not in found:
    raise DataError(
      f"{name}: prepared versions {', '.join(found)} in {dataset_dir}, but "
      f"tensorflow-datasets {tfds.__version__} reads version {version}; "
      f"{_prepare_hint(name, root)}"
    )
  if not any(prepared.glob(f"{name}-{split}.array_record-*")):
    others = sorted(p.name for p in prepared.glob(f"{name}-{split}.*"))
    if others:
      raise DataError(
        f"{name}: split {split!r} in {prepared} is not in the array_record format "
        f"that random access needs (found {others[0]}, ...); "
        f"{_prepare_hint(name, root)}"
      )
    raise DataError(f"{name}: no split {split!r} in {prepared}; {_prepare_hint(name, root)}")
  try:
    source = tfds.data_source(name, split=split, data_dir=os.fspath(root), download=False)
  except (OSError, ValueError, AssertionError, NotImplementedError) as e:
    raise DataError(f"{name}: tfds cannot open split {split!r} in {prepared}: {e}") from e
  count = len(source)
  images = np.empty((count,) + tuple(image_shape), np.uint8)
  labels = np.empty((count,), np.int64)
  # Item by item: tfds.testing.mock_data's data sources do not implement batched __getitems__.
  for i in range(count):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != tuple(image_shape):
      raise DataError(
        f"{name} {split!r}: example {i} has image shape {image.shape}, expected "
        f"{tuple(image_shape)}"
      )
    images[i] = image
    labels[i] = example["label"]
  return check_image_arrays(
    name, split, images, labels, image_shape=image_shape, num_classes=num_classes
  )


# --------------------------------------------------------------------------------------------------
# Augmentation and normalisation.


def draw_crop_flip(
  rng: np.random.Generator, count: int, padding: int
) -> tuple[np.ndarray, np.ndarray]:
  """Draws crop offsets uniform in {0, ..., 2 padding}^2 and fair coin flips for ``count`` images.

  Returns:
    offsets int [count, 2] (row, column) into the padded image, flips bool [count].
  """
  offsets = rng.integers(0, 2 * padding + 1, size=(count, 2))
  flips = rng.random(count) < 0.5
  return offsets, flips


def crop_and_flip(
  images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int
) -> np.ndarray:
  """Random crop with zero padding, then horizontal flip, for a batch at once.

  With P the image zero-padded by ``padding`` = p pixels on every side and (r, c) = ``offsets[n]``:

    out[n, i, j] = P[n, r + i, c + j]            if not flips[n],
    out[n, i, j] = P[n, r + i, c + W - 1 - j]    if flips[n],

  i.e. torchvision's RandomCrop(H, padding) followed by RandomHorizontalFlip, applied before
  normalisation (padding pixels are black). A flipped crop is computed as the crop of the flipped
  padded image at column 2p - c, since flip(P)[i, 2p - c + j] = P[i, c + W - 1 - j]; so every output
  is one strided window of one padded array.

  Args:
    images: [B, H, W, C].
    offsets: int [B, 2] in [0, 2 padding].
    flips: bool [B].
    padding: zero padding on every side.

  Returns:
    [B, H, W, C], same dtype as ``images``, C-contiguous.
  """
  count, height, width, _ = images.shape
  source = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  padded = np.pad(source, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
  cols = np.where(flips, 2 * padding - offsets[:, 1], offsets[:, 1])
  crops = windows[np.arange(count), offsets[:, 0], cols]  # [B, C, H, W]
  return np.ascontiguousarray(crops.transpose(0, 2, 3, 1))


def normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """x' = (x / 255 - mean_c) / std_c per channel c, as float32."""
  scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)
  shift = (np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
  inputs = np.multiply(images, scale, dtype=np.float32)
  inputs -= shift
  return inputs


# --------------------------------------------------------------------------------------------------
# Reader.


class ArrayReader:
  """Reads examples of a split held in memory (a ``pipeline.Reader``): gathers the images, crops
  and flips each with its own generator when augmenting (``draw_crop_flip`` of one image, then
  ``crop_and_flip`` of the batch), normalises.

  Attributes:
    num_examples: examples in the split.
    input_shape: [H, W, C].
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_padding: int = 4,
  ):
    """Wraps checked arrays (see ``check_image_arrays``).

    Args:
      images: uint8 [N, H, W, C].
      labels: int32 [N].
      mean: per-channel mean of x / 255.
      std: per-channel standard deviation of x / 255.
      crop_padding: zero padding of the random crop.

    Raises:
      DataError: a negative ``crop_padding``, or ``mean``/``std`` not one value per channel.
    """
    if crop_padding < 0:
      raise DataError(f"crop_padding {crop_padding} must be non-negative")
    channels = images.shape[-1]
    if len(mean) != channels or len(std) != channels:
      raise DataError(f"mean {mean} and std {std} need one value per channel ({channels})")
    self._images = images
    self._labels = labels
    self._mean = tuple(mean)
    self._std = tuple(std)
    self._padding = crop_padding
    self.num_examples = images.shape[0]
    self.input_shape = tuple(images.shape[1:])

  def __call__(
    self, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None
  ) -> tuple[np.ndarray, np.ndarray]:
    images = self._images[indices]
    if rngs is not None:
      offsets, flips = zip(*(draw_crop_flip(rng, 1, self._padding) for rng in rngs))
      images = crop_and_flip(images, np.concatenate(offsets), np.concatenate(flips), self._padding)
    return normalise(images, self._mean, self._std), self._labels[indices]


# --------------------------------------------------------------------------------------------------
# Datasets.


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """What the loader needs to know about one dataset.

  Attributes:
    splits: split names.
    num_classes: number of classes.
    image_shape: [H, W, C].
    mean: per-channel mean of x / 255 over the training split.
    std: per-channel standard deviation of x / 255 over the training split.
    augment: whether training augments by default.
    crop_padding: zero padding of the random crop when augmenting.
    read: (split, data_dir) -> checked ImageArrays.
  """

  splits: tuple[str, ...]
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: bool
  crop_padding: int
  read: Callable[[str, str | None], ImageArrays]


def _read_cifar(name: str, num_classes: int) -> Callable[[str, str | None], ImageArrays]:
  """The reader of one CIFAR dataset: its prepared folder, else tfds data prepared before, else
  a preparation from the official archive (local copy or download) first."""

  def read(split: str, data_dir: str | None) -> ImageArrays:
    _check_split(name, split, ("train", "test"))
    root = tfds_data_dir(data_dir)
    if not cifar_archive.is_prepared(name, root):
      if any((root / name).glob("*/dataset_info.json")):
        return read_tfds_images(name, split, root, image_shape=(32, 32, 3), num_classes=num_classes)
      cifar_archive.prepare(name, root)
    images, labels = cifar_archive.read_prepared(name, split, root)
    return check_image_arrays(
      name, split, images, labels, image_shape=(32, 32, 3), num_classes=num_classes
    )

  return read


# Normalisation constants: population mean and standard deviation of x / 255 over all pixels of the
# training split (per channel), computed from the data; tests check digits and Fashion-MNIST against
# their files. For CIFAR-10 many repositories use std (0.2023, 0.1994, 0.2010), an average of
# per-image deviations; the values here are the population ones.
DATASETS: dict[str, ImageDataset] = {
  "digits": ImageDataset(
    splits=("train", "test"),
    num_classes=10,
    image_shape=(8, 8, 1),
    mean=(0.30543,),
    std=(0.37596,),
    augment=False,
    crop_padding=1,
    read=lambda split, data_dir: read_digits(split),
  ),
  "fashion_mnist": ImageDataset(
    splits=("train", "test"),
    num_classes=10,
    image_shape=(28, 28, 1),
    mean=(0.28604,),
    std=(0.35302,),
    augment=False,
    crop_padding=4,
    read=read_fashion_mnist,
  ),
  "cifar10": ImageDataset(
    splits=("train", "test"),
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augment=True,
    crop_padding=4,
    read=_read_cifar("cifar10", 10),
  ),
  "cifar100": ImageDataset(
    splits=("train", "test"),
    num_classes=100,
    image_shape=(32, 32, 3),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    augment=True,
    crop_padding=4,
    read=_read_cifar("cifar100", 100),
  ),
}


def load(
  name: str,
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
  """Reads one split of an image dataset of ``DATASETS`` and batches it (``pipeline.GrainBatches``).

  Args:
    name: a key of ``DATASETS``.
    split: "train" or "test".
    batch_size: global batch size, divisible by ``process_count``.
    train: training pipeline (shuffled, augmented by default for CIFAR, last batch dropped) or
      evaluation pipeline (stored order, last batch padded with ``PAD_LABEL``).
    seed: non-negative run seed.
    data_dir: data folder; None for the dataset's default (unused by digits).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: crop-and-flip augmentation; None for the dataset's default when training, off for
      evaluation.
    num_workers: worker processes making batches; None for 0 (in this process: gathering and
      normalising a batch in memory costs less than handing it over from another process).

  Raises:
    DataError: unknown name or split, missing or malformed data, inconsistent arguments.
  """
  if name not in DATASETS:
    raise DataError(f"unknown image dataset {name!r}; allowed: {', '.join(DATASETS)}")
  dataset = DATASETS[name]
  _check_split(name, split, dataset.splits)
  if augment is None:
    augment = dataset.augment and train
  arrays = dataset.read(split, data_dir)
  reader = ArrayReader(
    arrays.images,
    arrays.labels,
    mean=dataset.mean,
    std=dataset.std,
    crop_padding=dataset.crop_padding,
  )
  return GrainBatches(
    reader,
    num_classes=dataset.num_classes,
    batch_size=batch_size,
    train=train,
    seed=seed,
    augment=augment,
    process_index=process_index,
    process_count=process_count,
    num_workers=num_workers or 0,
  )
