"""ImageNet-1k from prepared tensorflow-datasets array_record files, decoded in worker processes.

TensorFlow stays out of the training process: records are read with tfds' random-access data
source (``imagenet2012`` prepared once in the array_record format), the JPEG bytes are decoded with
PIL and augmented in NumPy, by an ``pipeline.ExampleReader`` that ``pipeline.GrainBatches`` runs in
grain worker processes (one per CPU core by default). Order, sharding, padding and the seeding of
the augmentation are those of every pipeline (``experiments.input.pipeline``): the random resized
crop and flip of example i in epoch e draw from (seed, e, i), so a batch depends only on (seed,
epoch, batch index), never on the number of workers or processes, and a run resumed at batch k
sees what an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from experiments.input.base import DataError
from experiments.input.images import normalise, tfds_data_dir
from experiments.input.pipeline import ExampleReader, GrainBatches, decoding_parallelism

# Per-channel ImageNet statistics of RGB values in [0, 1] (the torchvision convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "test")
_TFDS_SPLITS = {"train": "train", "test": "validation"}
_TFDS_NAME = "imagenet2012"


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  *,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Draws the crop box of the standard random-resized-crop augmentation.

  Up to ``attempts`` times: area fraction s ~ U(scale), log aspect ~ U(log ratio), crop width
  w = round(sqrt(s H W a)), height h = round(sqrt(s H W / a)); the first box that fits is placed
  uniformly. If none fits, the whole image is taken, cut to the nearest aspect ratio in ``ratio``
  and centred.

  Args:
    height: image height H.
    width: image width W.
    rng: random generator.
    scale: range of the crop area as a fraction of H W.
    ratio: range of the crop aspect ratio w / h.
    attempts: draws before the fallback.

  Returns:
    (top, left, h, w) in pixels.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def train_image(data: bytes, rng: np.random.Generator, size: int = 224) -> np.ndarray:
  """Training preprocessing of one encoded image: random resized crop, flip, normalisation.

  The crop box is drawn from the header size (:func:`random_resized_crop_box`); a JPEG is then
  decoded at the smallest DCT scale 1/2^k that keeps the crop at least ``size`` pixels on each
  side, and the box is resampled bilinearly (antialiased) to ``size`` x ``size``. The result is
  flipped horizontally with probability 1/2 and normalised with ``images.normalise`` and the
  ImageNet statistics.

  Args:
    data: encoded image (JPEG, or any format PIL reads).
    rng: the example's random generator.
    size: output side.

  Returns:
    float32 [size, size, 3].
  """
  image = Image.open(io.BytesIO(data))
  width, height = image.size
  top, left, h, w = random_resized_crop_box(height, width, rng)
  drafted = image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
  sx, sy = (drafted[1][2] / width, drafted[1][3] / height) if drafted else (1.0, 1.0)
  image = image.convert("RGB")
  box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  crop = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  return normalise(crop, IMAGENET_MEAN, IMAGENET_STD)


def eval_image(data: bytes, resize: int = 256, size: int = 224) -> np.ndarray:
  """Evaluation preprocessing of one encoded image: resize, centre crop, normalisation.

  The shorter side is resized to ``resize`` (bilinear, antialiased; the longer side to
  floor(resize * long / short)), then the central ``size`` x ``size`` window is cut at offset
  round((side - size) / 2) and normalised with ``images.normalise`` and the ImageNet statistics.

  Args:
    data: encoded image.
    resize: target of the shorter side.
    size: output side.

  Returns:
    float32 [size, size, 3].
  """
  image = Image.open(io.BytesIO(data)).convert("RGB")
  width, height = image.size
  if height <= width:
    new_h, new_w = resize, int(resize * width / height)
  else:
    new_h, new_w = int(resize * height / width), resize
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  crop = np.asarray(image)[top : top + size, left : left + size]
  return normalise(crop, IMAGENET_MEAN, IMAGENET_STD)


def _prepare_instructions(data_dir: str) -> str:
  return (
    f"Prepare ImageNet-1k once in the array_record format: put ILSVRC2012_img_train.tar and "
    f"ILSVRC2012_img_val.tar in a manual directory M and run (TensorFlow is needed for this "
    f"step only) `tfds build {_TFDS_NAME} --manual_dir=M --data_dir={data_dir} "
    f"--file_format=array_record`."
  )


def _open_source(data_dir: str, split: str) -> tuple[Any, int]:
  """Opens the tfds data source of a split with undecoded images; returns it and the class count."""
  if not os.path.isdir(os.path.join(data_dir, _TFDS_NAME)):
    raise DataError(
      f"imagenet: no {_TFDS_NAME} folder in {data_dir}. " + _prepare_instructions(data_dir)
    )
  import tensorflow_datasets as tfds  # imported here: only this loader needs it, and it is slow

  builder = tfds.builder(_TFDS_NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(
      f"imagenet: {_TFDS_NAME} is not prepared in {builder.data_dir} (no "
      f"dataset_info.json). " + _prepare_instructions(data_dir)
    )
  array_record = tfds.core.FileFormat.ARRAY_RECORD
  if array_record not in builder.info.available_file_formats():
    raise DataError(
      f"imagenet: {_TFDS_NAME} in {builder.data_dir} is stored as "
      f"{builder.info.file_format.value}; random access needs array_record. Convert it in place "
      f"with `tfds convert_format --dataset_version_dir={builder.data_dir} "
      f"--out_file_format=array_record`. " + _prepare_instructions(data_dir)
    )
  source = builder.as_data_source(
    split=_TFDS_SPLITS[split],
    file_format=array_record,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  return source, builder.info.features["label"].num_classes


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
  image_size: int = 224,
) -> GrainBatches:
  """ImageNet-1k (tfds ``imagenet2012``, array_record) as the batches of one process.

  With augmentation (the training default) examples go through :func:`train_image`, otherwise
  through :func:`eval_image`. Labels are the tfds class indices (the 1000 wnids in sorted order).

  Args:
    split: "train", or "test" for the 50,000 ILSVRC2012 validation images.
    batch_size: global batch size, divisible by ``process_count``.
    train: training pipeline (shuffled, last batch dropped) or evaluation pipeline (stored
      order, last batch padded with ``PAD_LABEL``).
    seed: non-negative run seed.
    data_dir: the tfds data folder holding ``imagenet2012/<version>/``; None for
      ``images.tfds_data_dir()`` ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: random resized crop and flip; None for on when training, off otherwise.
    num_workers: decoding worker processes; 0 or None (the default) for one thread per core in
      this process (``pipeline.decoding_parallelism``).
    image_size: side of the square network input.

  Returns:
    A ``pipeline.GrainBatches`` with input shape [image_size, image_size, 3].

  Raises:
    DataError: unknown split, inconsistent arguments, or prepared data missing or not in the
      array_record format (the message says how to prepare them; nothing is ever downloaded).
  """
  if split not in SPLITS:
    raise DataError(f"imagenet: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
  augment = train if augment is None else augment
  source, num_classes = _open_source(os.fspath(tfds_data_dir(data_dir)), split)

  def example(index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    record = source[index]
    image = (
      eval_image(record["image"], size=image_size)
      if rng is None
      else train_image(record["image"], rng, image_size)
    )
    return image, int(record["label"])

  reader = ExampleReader(example, len(source), (image_size, image_size, 3))
  return GrainBatches(
    reader,
    num_classes=num_classes,
    batch_size=batch_size,
    train=train,
    seed=seed,
    augment=augment,
    process_index=process_index,
    process_count=process_count,
    **decoding_parallelism(num_workers),
  )
