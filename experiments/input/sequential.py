"""Sequential Fashion-MNIST: each 28x28 image fed as a sequence of T = 7 chunks of 4 rows.

Step t in 0..6 sees rows 4t..4t+3 of the image, so one example is time-major [7, 4, 28, 1]:

  x_seq[t, i, j, 0] = x[4 t + i, j, 0].

Images are read, ordered, sharded, padded and normalised exactly as the static Fashion-MNIST
pipeline of ``experiments.input.images`` (its IDX reader, ``ArrayReader``, normalisation constants
and ``pipeline.GrainBatches``); this module only cuts every batch into row chunks. Optional
augmentation is that pipeline's random crop (4-pixel zero padding) and horizontal flip of the whole
image, before the cut.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from experiments.input import images
from experiments.input.base import DataError
from experiments.input.pipeline import GrainBatches

ROWS_PER_STEP = 4
TIME_STEPS = 28 // ROWS_PER_STEP


def to_row_chunks(batch: np.ndarray, rows_per_step: int = ROWS_PER_STEP) -> np.ndarray:
  """Cuts images [B, H, W, C] into row chunks [B, H / r, r, W, C], r = ``rows_per_step``.

  Chunk t of image n holds its rows r t .. r t + r - 1: out[n, t, i] = batch[n, r t + i].

  Raises:
    DataError: H not divisible by ``rows_per_step``.
  """
  count, height, width, channels = batch.shape
  if height % rows_per_step:
    raise DataError(f"image height {height} is not a multiple of rows_per_step {rows_per_step}")
  return batch.reshape(count, height // rows_per_step, rows_per_step, width, channels)


class RowChunkBatches:
  """Image batches of ``pipeline.GrainBatches`` delivered as sequences of row chunks.

  Implements ``base.Batches`` with ``time_major`` True and input shape [T, 4, 28, 1]; the order,
  sharding and padding (``PAD_LABEL``) are those of the wrapped batches.
  """

  time_major = True

  def __init__(self, batches: GrainBatches, rows_per_step: int = ROWS_PER_STEP):
    empty = np.zeros((0,) + tuple(batches.input_shape), np.float32)
    self._batches = batches
    self._rows_per_step = rows_per_step
    self.num_classes = batches.num_classes
    self.input_shape = to_row_chunks(empty, rows_per_step).shape[1:]
    self.batches_per_epoch = batches.batches_per_epoch
    self.num_examples = batches.num_examples
    self.batch_size = batches.batch_size
    self.local_batch_size = batches.local_batch_size

  def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (inputs float32 [G/P, T, 4, 28, 1], labels int32 [G/P]) for batches start.."""
    return (
      (to_row_chunks(x, self._rows_per_step), y) for x, y in self._batches.epoch(epoch, start)
    )


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
) -> RowChunkBatches:
  """Sequential Fashion-MNIST as the batches of one process.

  Args:
    split: "train" (60,000 images) or "test" (10,000).
    batch_size: global batch size, divisible by ``process_count``.
    train: training pipeline (shuffled, last batch dropped) or evaluation pipeline (stored
      order, last batch padded with ``PAD_LABEL``).
    seed: non-negative run seed.
    data_dir: folder of the four IDX files; None for ``images.FASHION_MNIST_DIR``.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: crop and flip of the image before the cut; None for off (the default of
      Fashion-MNIST).
    num_workers: worker processes making batches; None for 0 (as ``images.load``).

  Raises:
    DataError: unknown split, inconsistent arguments, or missing or malformed files.
  """
  batches = images.load(
    "fashion_mnist",
    split,
    batch_size=batch_size,
    train=train,
    seed=seed,
    data_dir=data_dir,
    process_index=process_index,
    process_count=process_count,
    augment=augment,
    num_workers=num_workers,
  )
  return RowChunkBatches(batches)
