"""Input pipelines by name.

``load(name, split, ...)`` returns the ``Batches`` of one split for one process. Every entry of
``LOADERS`` is a ``base.Loader``; a new dataset is registered with one line mapping its name to its
loader (a function with the ``Loader`` signature).
"""

from __future__ import annotations

import functools

from experiments.input import dvs, imagenet, images, sequential, tiny_imagenet
from experiments.input.base import PAD_LABEL, Batches, DataError, Loader, valid_mask

LOADERS: dict[str, Loader] = {
  "digits": functools.partial(images.load, "digits"),
  "fashion_mnist": functools.partial(images.load, "fashion_mnist"),
  "cifar10": functools.partial(images.load, "cifar10"),
  "cifar100": functools.partial(images.load, "cifar100"),
  "imagenet": imagenet.load,
  "tiny_imagenet": tiny_imagenet.load,
  "cifar10_dvs": dvs.load,
  "sequential_fashion_mnist": sequential.load,
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
) -> Batches:
  """The batches of one split of dataset ``name`` for this process.

  Args:
    name: a key of ``LOADERS``.
    split: split name (e.g. "train", "test").
    batch_size: global batch size, divisible by ``process_count``; each process receives
      ``batch_size // process_count`` examples per batch.
    train: training pipeline (shuffled from ``seed``, augmented by the dataset's default, last
      incomplete batch dropped) or evaluation pipeline (stored order, last batch padded with
      examples labelled ``PAD_LABEL``; ``valid_mask(labels)`` selects the real ones).
    seed: non-negative run seed; order and augmentation of batch k of epoch e depend only on
      (seed, e, k).
    data_dir: data folder; None for the dataset's default.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing every global batch.
    augment: training augmentation on or off; None for the dataset's default.
    num_workers: worker processes making the batches, 0 for none; None for the dataset's
      default (none: ImageNet and Tiny-ImageNet decode on one thread per core of this process,
      ``pipeline.decoding_parallelism``; the others make batches on one thread).

  Raises:
    DataError: unknown name (the message lists the registered ones), or any problem the
      dataset's loader reports.
  """
  if name not in LOADERS:
    raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(LOADERS))}")
  return LOADERS[name](
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


__all__ = ["LOADERS", "PAD_LABEL", "Batches", "DataError", "Loader", "load", "valid_mask"]
