"""The batches of every dataset, through grain: order, sharding, padding and augmentation.

A dataset supplies a reader: a picklable callable that returns the examples of given indices
(:class:`ExampleReader` wraps a function that decodes one record at a time; in-memory splits read a
whole batch at once). :class:`GrainBatches` turns it into the batches of one process
(``base.Batches``), one grain ``MapDataset`` per epoch (:meth:`GrainBatches.dataset`) whose
elements are this process's batches, each made by one call of the reader:

* order: for N examples and global batch size G, training epoch e visits the permutation of
  range(N) that NumPy draws from (seed, e) in floor(N / G) global batches (the incomplete tail is
  dropped); evaluation visits range(N) in ceil(N / G) global batches, the last one padded with
  zero inputs labelled ``PAD_LABEL`` (:func:`epoch_order`). The permutation is the order every
  earlier version of this package drew: runs resume across versions on the same batches. (grain's
  index shuffle draws other orders, and with them the digits run of the non-finite test
  overflowed before its first checkpoint instead of after it.)
* sharding: process p of P receives the slice [p G / P, (p + 1) G / P) of every global batch,
  which is local batch k P + p of the epoch's order cut into batches of G / P: the slice
  ``[p::P]`` of the MapDataset of local batches. The order is cut by a reshape rather than by
  grain's ``batch`` of one element per example: grain accounts for every element read (about
  30 us each), which made a Fashion-MNIST epoch cost 1.7 s instead of 0.1 s;
* augmentation (training, where enabled): example i of epoch e is augmented with the generator
  :func:`example_rng` (seed, e, i), whatever its position, so an example is augmented identically
  whatever the number of processes and workers and whether the epoch was resumed. (grain's
  ``random_map`` would draw from a Philox generator keyed by a dataset seed and the position
  instead: other random numbers than the augmentations of this package have always drawn.)
* resumption: batch k of epoch e depends only on (seed, e, k), and ``epoch(e, start=k)`` reads the
  MapDataset from position k by random access. A checkpoint therefore needs only (epoch, batch),
  which the training driver stores anyway; grain's iterator state would be a second file to keep
  in step with each checkpoint, and it depends on the number of workers.
* workers and threads: with ``num_workers`` > 0 the batches are made in that many processes
  (grain's ``mp_prefetch``, each worker making whole batches, delivered in order); with 0, in this
  process by ``num_threads`` threads (grain's read threads, each making whole batches, delivered in
  order; decoding and resizing release the GIL), ``prefetch_batches`` ahead of the consumer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import grain
import numpy as np
from absl import flags

from experiments.input.base import PAD_LABEL, DataError, check_batching

PAD_INDEX = -1
"""Example index of the padding slots of the last evaluation batch."""

# Streams of the seed sequence (seed, stream, ...).
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def decoding_threads() -> int:
  """Threads of the pipelines that decode files (ImageNet, Tiny-ImageNet) when they use no worker
  processes, their default: one per CPU core this process may run on, at most 32. On 2 cores two
  threads made 375 training images/s against 271 with two worker processes (decoding and resizing
  release the GIL; workers pay for handing the batches over; BENCHMARKS.md, "ImageNet input
  pipeline")."""
  return min(32, len(os.sched_getaffinity(0)))


def decoding_parallelism(num_workers: int | None) -> dict[str, int]:
  """``num_workers`` and ``num_threads`` of a decoding pipeline: N > 0 worker processes of one
  thread each, or (0 or None, the default) :func:`decoding_threads` threads of this process."""
  if num_workers:
    return {"num_workers": num_workers, "num_threads": 1}
  return {"num_workers": 0, "num_threads": decoding_threads()}


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation generator of example ``index`` in ``epoch``, seeded by (seed, 1, epoch,
  index)."""
  return np.random.default_rng(np.random.SeedSequence((seed, _AUGMENT_STREAM, epoch, index)))


def epoch_order(
  num_examples: int, batch_size: int, *, train: bool, seed: int, epoch: int
) -> np.ndarray:
  """The example index at every position of one epoch's global batches (module docstring).

  Args:
    num_examples: examples in the split, N.
    batch_size: global batch size, G.
    train: shuffle per epoch and drop the incomplete tail (training), or keep the stored order
      and pad the last batch (evaluation).
    seed: non-negative run seed.
    epoch: non-negative epoch number.

  Returns:
    int64 [floor(N / G) G]: the head of the permutation of range(N) drawn from (seed, epoch), in
    training; int64 [ceil(N / G) G]: range(N) followed by ``PAD_INDEX``, in evaluation.

  Raises:
    ValueError: a non-positive size, or a negative seed or epoch.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f"num_examples {num_examples} and batch_size {batch_size} must be positive")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed {seed} and epoch {epoch} must be non-negative")
  if train:
    rng = np.random.default_rng(np.random.SeedSequence((seed, _ORDER_STREAM, epoch)))
    return rng.permutation(num_examples)[: num_examples // batch_size * batch_size]
  order = np.full(-(-num_examples // batch_size) * batch_size, PAD_INDEX, np.int64)
  order[:num_examples] = np.arange(num_examples)
  return order


class Reader(Protocol):
  """The examples of one split by index; picklable, so that worker processes can run it.

  Attributes:
    num_examples: examples in the split.
    input_shape: shape of one example.
  """

  num_examples: int
  input_shape: tuple[int, ...]

  def __call__(
    self, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None
  ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs float32 [n, *input_shape], labels int [n]) of examples ``indices`` [n]; ``rngs``
    holds each example's augmentation generator, or is None without augmentation."""
    ...


ExampleFn = Callable[[int, "np.random.Generator | None"], tuple[np.ndarray, int]]


class ExampleReader:
  """A reader that decodes one record at a time: ``example(index, rng or None) -> (input, label)``.

  Errors of unreadable or broken records (what PIL and NumPy raise: OSError, SyntaxError) become a
  ``DataError`` naming the example.
  """

  def __init__(self, example: ExampleFn, num_examples: int, input_shape: Sequence[int]):
    self._example = example
    self.num_examples = num_examples
    self.input_shape = tuple(input_shape)

  def __call__(
    self, indices: np.ndarray, rngs: Sequence[np.random.Generator] | None
  ) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.empty((len(indices),) + self.input_shape, np.float32)
    labels = np.empty(len(indices), np.int32)
    for k, index in enumerate(indices):
      try:
        inputs[k], labels[k] = self._example(int(index), None if rngs is None else rngs[k])
      except (OSError, SyntaxError) as e:
        raise DataError(f"example {index}: {e}") from e
    return inputs, labels


class _ReadBatch:
  """The grain map from a local batch of example indices to (inputs, labels), padding included."""

  def __init__(self, reader: Reader, *, seed: int, epoch: int, augment: bool):
    self._reader = reader
    self._seed = seed
    self._epoch = epoch
    self._augment = augment

  def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = np.flatnonzero(indices != PAD_INDEX)
    chosen = indices[real]
    rngs = [example_rng(self._seed, self._epoch, int(i)) for i in chosen] if self._augment else None
    if len(chosen) == len(indices):  # no padding: the reader's arrays, without another copy
      inputs, labels = self._reader(chosen, rngs)
      return inputs, labels.astype(np.int32, copy=False)
    inputs = np.zeros((len(indices),) + self._reader.input_shape, np.float32)
    labels = np.full(len(indices), PAD_LABEL, np.int32)
    inputs[real], labels[real] = self._reader(chosen, rngs)
    return inputs, labels


class GrainBatches:
  """Batches of one process over a reader (implements ``base.Batches``; module docstring).

  Attributes:
    num_classes: number of classes.
    input_shape: shape of one example.
    time_major: whether examples carry their own time axis.
    batches_per_epoch: batches in one epoch (the same for every process).
    num_examples: examples in the split (padding excluded).
    batch_size: global batch size G.
    local_batch_size: G / P, the leading size of the arrays this process receives.
  """

  def __init__(
    self,
    reader: Reader,
    *,
    num_classes: int,
    batch_size: int,
    train: bool,
    seed: int,
    augment: bool = False,
    time_major: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    num_threads: int = 1,
    prefetch_batches: int = 2,
  ):
    """Wraps a reader.

    Args:
      reader: the split's examples (see :class:`Reader`).
      num_classes: number of classes.
      batch_size: global batch size G, divisible by ``process_count``.
      train: shuffle and drop the last incomplete batch; otherwise keep the stored order and pad.
      seed: non-negative run seed.
      augment: hand the reader each example's generator (training only).
      time_major: whether examples carry their own time axis.
      process_index: this process, in [0, process_count).
      process_count: number of processes sharing every global batch.
      num_workers: worker processes making batches; 0 makes them in this process.
      num_threads: threads making batches in this process (in each worker with workers), >= 1.
      prefetch_batches: batches made ahead of the consumer (per worker with workers), >= 1.

    Raises:
      DataError: inconsistent arguments, or fewer training examples than one global batch.
    """
    check_batching(
      batch_size=batch_size,
      train=train,
      seed=seed,
      augment=augment,
      process_index=process_index,
      process_count=process_count,
    )
    if num_workers < 0:
      raise DataError(f"num_workers {num_workers} must be non-negative")
    if num_threads < 1:
      raise DataError(f"num_threads {num_threads} must be at least 1")
    if prefetch_batches < 1:
      raise DataError(f"prefetch_batches {prefetch_batches} must be at least 1")
    count = reader.num_examples
    if count < 1:
      raise DataError("the split is empty")
    if train and count < batch_size:
      raise DataError(
        f"the training split has {count} examples, fewer than one global batch of {batch_size}"
      )
    self._reader = reader
    self._train = train
    self._seed = seed
    self._augment = bool(augment)
    self._process_index = process_index
    self._process_count = process_count
    self._num_workers = num_workers
    self._num_threads = num_threads
    self._prefetch_batches = prefetch_batches
    self.num_classes = num_classes
    self.input_shape = reader.input_shape
    self.time_major = time_major
    self.num_examples = count
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.batches_per_epoch = count // batch_size if train else -(-count // batch_size)

  def dataset(self, epoch: int) -> grain.MapDataset:
    """This process's batches of ``epoch``: a MapDataset of (inputs, labels), random access."""
    order = epoch_order(
      self.num_examples, self.batch_size, train=self._train, seed=self._seed, epoch=epoch
    )
    batches = grain.MapDataset.source(order.reshape(-1, self.local_batch_size))
    local = batches[self._process_index :: self._process_count]
    return local.map(_ReadBatch(self._reader, seed=self._seed, epoch=epoch, augment=self._augment))

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
    return self._iterate(self.dataset(epoch)[start:])

  def _iterate(self, batches: grain.MapDataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    dataset = batches.to_iter_dataset(
      grain.ReadOptions(
        num_threads=self._num_threads,
        prefetch_buffer_size=max(self._prefetch_batches, self._num_threads),
      )
    )
    if self._num_workers:
      # grain 0.2.18 reads one of its absl flags when it starts workers, which fails in programs
      # that parse no absl flags (pytest, notebooks); those take the flags' defaults.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=self._prefetch_batches
        )
      )
    iterator = iter(dataset)
    try:
      for inputs, labels in iterator:
        # Workers hand over shared-memory arrays; plain views of them free it with the batch.
        yield np.asarray(inputs), np.asarray(labels)
    finally:
      iterator.close()
