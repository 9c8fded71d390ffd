"""The interface every input pipeline implements.

A pipeline is deterministic given (seed, epoch, batch index), so that a run resumed mid-epoch sees
exactly the batches an uninterrupted run would have seen. Every dataset implements it with
``experiments.input.pipeline.GrainBatches``.

Batch sizes given to a loader are global: with ``process_count`` processes each process receives
its own contiguous slice of ``batch_size // process_count`` examples of every global batch.

Evaluation pipelines keep every example: the last global batch is padded to full size, and a padded
example carries the label ``PAD_LABEL`` (negative), so that batch shapes stay static under ``jit``
and ``valid_mask(labels)`` counts every real example exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

PAD_LABEL = -1
"""Label of the padding examples that fill the last evaluation batch; never a real class."""


class DataError(ValueError):
  """Missing, malformed or inconsistent data; the message says what and where."""


def valid_mask(labels: np.ndarray) -> np.ndarray:
  """Boolean mask of the real (not padding) examples of a batch: ``labels != PAD_LABEL``."""
  return labels != PAD_LABEL


def check_batching(
  *,
  batch_size: int,
  train: bool,
  seed: int,
  augment: bool | None,
  process_index: int,
  process_count: int,
) -> None:
  """Checks the batching arguments shared by every loader, before any data is read.

  Raises:
    DataError: process_index outside [0, process_count), a global batch size that is not a
      positive multiple of process_count, a negative seed, or augmentation asked for evaluation.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(
      f"process_index {process_index} must lie in [0, process_count) with "
      f"process_count {process_count} >= 1"
    )
  if batch_size < 1 or batch_size % process_count:
    raise DataError(
      f"global batch size {batch_size} must be a positive multiple of process_count {process_count}"
    )
  if seed < 0:
    raise DataError(f"seed {seed} must be non-negative")
  if augment and not train:
    raise DataError("augmentation is for training pipelines; pass augment=False with train=False")


class Batches(Protocol):
  """One split of a dataset, delivered as batches for one process.

  Attributes:
    num_classes: number of classes.
    input_shape: shape of one example as the network receives it: [H, W, C] for images (the same
      image is fed at every step), or [T, H, W, C] for time-major inputs (event frames, sequences).
    time_major: whether examples carry their own time axis.
    batches_per_epoch: batches in one epoch for this process.
  """

  num_classes: int
  input_shape: tuple[int, ...]
  time_major: bool
  batches_per_epoch: int

  def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (inputs float32 [B, ...], labels int32 [B]) for batches start.. of ``epoch``."""
    ...


class Loader(Protocol):
  """Builds the ``Batches`` of one split; what ``experiments.input.load`` dispatches to by name.

  Args:
    split: split name, e.g. "train" or "test".
    batch_size: global batch size, divisible by ``process_count``.
    train: shuffle, augment (if enabled) and drop the last incomplete batch; otherwise keep the
      stored order and pad the last batch with ``PAD_LABEL`` examples.
    seed: drives the order and the augmentation, together with the epoch and the batch index.
    data_dir: where the data lies; None for the dataset's default place.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: training augmentation on or off; None for the dataset's default.
    num_workers: worker processes making the batches, 0 for none; None for the dataset's default.
  """

  def __call__(
    self,
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
  ) -> Batches: ...
