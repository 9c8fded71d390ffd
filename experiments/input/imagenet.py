"""ImageNet-1k from prepared tensorflow-datasets array_record files, decoded on a thread pool.

TensorFlow stays out of the training process: records are read with tfds' random-access data
source (``imagenet2012`` prepared once in the array_record format), the JPEG bytes are decoded with
PIL on worker threads (PIL releases the GIL while decoding and resampling) and augmented in NumPy.
The same threaded record pipeline, :class:`RecordBatches`, serves the other file-backed datasets of
this package (Tiny-ImageNet, CIFAR10-DVS frames).

Batching follows ``experiments.input.base``: ``batch_size`` G is global; for N examples, training
epoch e visits the permutation of range(N) drawn from (seed, e) in floor(N / G) global batches
(the incomplete tail is dropped), evaluation visits the stored order in ceil(N / G) global batches,
the last one padded with zero inputs labelled ``PAD_LABEL``. Process p of P receives the slice
[p G / P, (p + 1) G / P) of every global batch. The augmentation of example i in epoch e draws from
(seed, e, i), so a batch depends only on (seed, epoch, batch index), never on thread timing or on
the number of processes, and a run resumed at batch k sees what an uninterrupted run would have
seen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import itertools
import math
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from experiments.input.base import PAD_LABEL, DataError, check_batching
from experiments.input.images import normalise, tfds_data_dir

# Per-channel ImageNet statistics of RGB values in [0, 1] (the torchvision convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "test")
_TFDS_SPLITS = {"train": "train", "test": "validation"}
_TFDS_NAME = "imagenet2012"

# Streams of the seed sequence (seed, stream, ...): the same order stream as
# ``images.ArrayBatches``, so a split of N examples is visited in the same order by both.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1

ExampleFn = Callable[[int, "np.random.Generator | None"], tuple[np.ndarray, int]]


def batch_plan(num_examples: int, batch_size: int, *, train: bool, seed: int,
               epoch: int) -> np.ndarray:
  """Example indices of every global batch of one epoch (see the module docstring).

  Args:
    num_examples: examples in the split, N.
    batch_size: global batch size, G.
    train: shuffle per epoch and drop the incomplete tail (training), or keep the stored order
      and pad the last batch (evaluation).
    seed: non-negative run seed.
    epoch: non-negative epoch number.

  Returns:
    int64 [num_batches, G]: floor(N / G) rows of a permutation of range(N) in training; ceil(N / G)
    rows of range(N) followed by -1 (padding slots) in evaluation.

  Raises:
    ValueError: a non-positive size, or a negative seed or epoch.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f"num_examples {num_examples} and batch_size {batch_size} must be positive")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed {seed} and epoch {epoch} must be non-negative")
  if train:
    num_batches = num_examples // batch_size
    rng = np.random.default_rng(np.random.SeedSequence((seed, _ORDER_STREAM, epoch)))
    order = rng.permutation(num_examples)[:num_batches * batch_size]
    return order.reshape(num_batches, batch_size)
  num_batches = -(-num_examples // batch_size)
  plan = np.full(num_batches * batch_size, -1, np.int64)
  plan[:num_examples] = np.arange(num_examples)
  return plan.reshape(num_batches, batch_size)


class RecordBatches:
  """Batches of one process over examples loaded one by one on a thread pool.

  Implements ``base.Batches`` (see the module docstring for the order and the sharding).
  ``example(i, rng)`` returns example i as float32 ``input_shape`` and its label; ``rng`` is the
  example's generator for the epoch, seeded by (seed, epoch, i), when augmenting, else None. Up to
  ``prefetch_batches`` batches are loaded while the consumer works on the current one.

  Attributes:
    num_classes: number of classes.
    input_shape: shape of one example.
    time_major: whether examples carry their own time axis.
    batches_per_epoch: batches in one epoch (the same for every process).
    num_examples: examples in the split (padding excluded).
    batch_size: global batch size G.
    local_batch_size: G / P, the leading size of the arrays this process receives.
  """

  def __init__(self, example: ExampleFn, num_examples: int, *, num_classes: int,
               input_shape: Sequence[int], batch_size: int, train: bool, seed: int,
               augment: bool = False, time_major: bool = False, process_index: int = 0,
               process_count: int = 1, num_threads: int | None = None,
               prefetch_batches: int = 2):
    """Wraps a random-access example function.

    Args:
      example: (index, rng or None) -> (float32 input of ``input_shape``, label).
      num_examples: examples in the split.
      num_classes: number of classes.
      input_shape: shape of one example.
      batch_size: global batch size G, divisible by ``process_count``.
      train: shuffle and drop the last incomplete batch; otherwise keep the stored order and pad.
      seed: non-negative run seed.
      augment: hand ``example`` a generator (training only).
      time_major: whether examples carry their own time axis.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing every global batch.
      num_threads: loading threads (default: the CPU count, at most 32).
      prefetch_batches: batches loaded ahead of the consumer, at least 1.

    Raises:
      DataError: inconsistent arguments, or fewer training examples than one global batch.
    """
    check_batching(batch_size=batch_size, train=train, seed=seed, augment=augment,
                   process_index=process_index, process_count=process_count)
    if prefetch_batches < 1:
      raise DataError(f"prefetch_batches {prefetch_batches} must be at least 1")
    if num_threads is not None and num_threads < 1:
      raise DataError(f"num_threads {num_threads} must be at least 1")
    if num_examples < 1 or (train and num_examples < batch_size):
      raise DataError(f"the split has {num_examples} examples; training needs at least one "
                      f"global batch of {batch_size}")
    self._example = example
    self._train = train
    self._seed = seed
    self._augment = bool(augment)
    self._num_threads = num_threads or min(32, os.cpu_count() or 1)
    self._prefetch_batches = prefetch_batches
    self.num_classes = num_classes
    self.input_shape = tuple(input_shape)
    self.time_major = time_major
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self._local = slice(process_index * self.local_batch_size,
                        (process_index + 1) * self.local_batch_size)
    self.batches_per_epoch = (num_examples // batch_size if train
                              else -(-num_examples // batch_size))

  def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (inputs float32 [G/P, ...], labels int32 [G/P]) for batches start.. of ``epoch``.

    Padding examples (evaluation only) have zero inputs and the label ``PAD_LABEL``.

    Raises:
      ValueError: negative ``epoch`` or ``start`` outside [0, batches_per_epoch].
    """
    if epoch < 0:
      raise ValueError(f"epoch {epoch} must be non-negative")
    if not 0 <= start <= self.batches_per_epoch:
      raise ValueError(f"start {start} must lie in [0, {self.batches_per_epoch}]")
    plan = batch_plan(self.num_examples, self.batch_size, train=self._train, seed=self._seed,
                      epoch=epoch)
    return self._generate(plan[start:, self._local], epoch)

  def _load(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
    rng = None
    if self._augment:
      rng = np.random.default_rng(np.random.SeedSequence((self._seed, _AUGMENT_STREAM, epoch,
                                                          index)))
    try:
      return self._example(index, rng)
    except (OSError, SyntaxError) as e:  # what PIL and NumPy raise on unreadable or broken files
      raise DataError(f"example {index}: {e}") from e

  def _submit(self, pool: concurrent.futures.Executor, row: np.ndarray, epoch: int):
    return row, [pool.submit(self._load, int(i), epoch) for i in row if i >= 0]

  def _collate(self, row: np.ndarray, futures) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.zeros((row.size,) + self.input_shape, np.float32)
    labels = np.full(row.size, PAD_LABEL, np.int32)
    real = np.flatnonzero(row >= 0)
    for k, future in zip(real, futures):
      inputs[k], labels[k] = future.result()
    return inputs, labels

  def _generate(self, plan: np.ndarray, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    pool = concurrent.futures.ThreadPoolExecutor(self._num_threads, thread_name_prefix="input")
    try:
      rows = iter(plan)
      pending = collections.deque(self._submit(pool, row, epoch)
                                  for row in itertools.islice(rows, self._prefetch_batches))
      while pending:
        row, futures = pending.popleft()
        following = next(rows, None)
        if following is not None:
          pending.append(self._submit(pool, following, epoch))
        yield self._collate(row, futures)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
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
  crop = np.asarray(image)[top:top + size, left:left + size]
  return normalise(crop, IMAGENET_MEAN, IMAGENET_STD)


def _prepare_instructions(data_dir: str) -> str:
  return (f"Prepare ImageNet-1k once in the array_record format: put ILSVRC2012_img_train.tar and "
          f"ILSVRC2012_img_val.tar in a manual directory M and run (TensorFlow is needed for this "
          f"step only) `tfds build {_TFDS_NAME} --manual_dir=M --data_dir={data_dir} "
          f"--file_format=array_record`.")


def _open_source(data_dir: str, split: str) -> tuple[Any, int]:
  """Opens the tfds data source of a split with undecoded images; returns it and the class count."""
  if not os.path.isdir(os.path.join(data_dir, _TFDS_NAME)):
    raise DataError(f"imagenet: no {_TFDS_NAME} folder in {data_dir}. "
                    + _prepare_instructions(data_dir))
  import tensorflow_datasets as tfds  # imported here: only this loader needs it, and it is slow

  builder = tfds.builder(_TFDS_NAME, data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(f"imagenet: {_TFDS_NAME} is not prepared in {builder.data_dir} (no "
                    f"dataset_info.json). " + _prepare_instructions(data_dir))
  array_record = tfds.core.FileFormat.ARRAY_RECORD
  if array_record not in builder.info.available_file_formats():
    raise DataError(
        f"imagenet: {_TFDS_NAME} in {builder.data_dir} is stored as "
        f"{builder.info.file_format.value}; random access needs array_record. Convert it in place "
        f"with `tfds convert_format --dataset_version_dir={builder.data_dir} "
        f"--out_file_format=array_record`. " + _prepare_instructions(data_dir))
  source = builder.as_data_source(split=_TFDS_SPLITS[split], file_format=array_record,
                                  decoders={"image": tfds.decode.SkipDecoding()})
  return source, builder.info.features["label"].num_classes


def load(split: str, *, batch_size: int, train: bool, seed: int, data_dir: str | None = None,
         process_index: int = 0, process_count: int = 1, augment: bool | None = None,
         image_size: int = 224, num_threads: int | None = None,
         prefetch_batches: int = 2) -> RecordBatches:
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
    image_size: side of the square network input.
    num_threads: decoding threads (default: the CPU count, at most 32).
    prefetch_batches: batches decoded ahead of the consumer.

  Returns:
    A :class:`RecordBatches` with input shape [image_size, image_size, 3].

  Raises:
    DataError: unknown split, inconsistent arguments, or prepared data missing or not in the
      array_record format (the message says how to prepare them; nothing is ever downloaded).
  """
  if split not in SPLITS:
    raise DataError(f"imagenet: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
  check_batching(batch_size=batch_size, train=train, seed=seed, augment=augment,
                 process_index=process_index, process_count=process_count)
  augment = train if augment is None else augment
  source, num_classes = _open_source(os.fspath(tfds_data_dir(data_dir)), split)

  def example(index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    record = source[index]
    image = (eval_image(record["image"], size=image_size) if rng is None
             else train_image(record["image"], rng, image_size))
    return image, int(record["label"])

  return RecordBatches(example, len(source), num_classes=num_classes,
                       input_shape=(image_size, image_size, 3), batch_size=batch_size,
                       train=train, seed=seed, augment=augment, process_index=process_index,
                       process_count=process_count, num_threads=num_threads,
                       prefetch_batches=prefetch_batches)
