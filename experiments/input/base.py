"""The interface every input pipeline implements.

A pipeline is deterministic given (seed, epoch, batch index), so that a run resumed mid-epoch sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np


class DataError(ValueError):
  """Missing, malformed or inconsistent data; the message says what and where."""


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
