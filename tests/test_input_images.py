"""Tests of the static-image input pipelines: readers, augmentation, batching, registry."""

import gzip
import json
import re
import struct

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import input as data
from experiments.input import cifar_archive, images, pipeline
from experiments.input.base import PAD_LABEL, DataError, valid_mask

MEAN3 = (0.4, 0.5, 0.6)
STD3 = (0.2, 0.25, 0.3)


def _random_split(count, shape=(32, 32, 3), num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (count,) + shape, dtype=np.uint8),
    rng.integers(0, num_classes, count).astype(np.int32),
  )


def _pipeline(x, y, *, batch_size=8, train=True, seed=3, augment=False, **kwargs):
  return pipeline.GrainBatches(
    images.ArrayReader(x, y, mean=MEAN3, std=STD3),
    num_classes=10,
    batch_size=batch_size,
    train=train,
    seed=seed,
    augment=augment,
    **kwargs,
  )


def _batches(count=100, augment=True, **kwargs):
  return _pipeline(*_random_split(count), augment=augment, **kwargs)


def _rows(a):
  """The rows of a 2-D array as a sorted list of bytes, to compare multisets of examples."""
  return sorted(bytes(r) for r in np.ascontiguousarray(a).reshape(len(a), -1))


# ------------------------------------------------------------------------------------------------
# Augmentation and normalisation.


def _crop_flip_reference(x, offsets, flips, padding):
  out = []
  for image, (r, c), flip in zip(x, offsets, flips):
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[r : r + x.shape[1], c : c + x.shape[2]]
    out.append(crop[:, ::-1] if flip else crop)
  return np.stack(out)


def test_crop_and_flip_equals_pad_crop_then_flip_per_image():
  x, _ = _random_split(64)
  offsets, flips = images.draw_crop_flip(np.random.default_rng(1), 64, 4)
  out = images.crop_and_flip(x, offsets, flips, 4)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, np.uint8)
  np.testing.assert_array_equal(out, _crop_flip_reference(x, offsets, flips, 4))


def test_crop_and_flip_special_offsets():
  x, _ = _random_split(2, shape=(6, 5, 2))
  p = 2
  centre = np.full((2, 2), p)
  np.testing.assert_array_equal(images.crop_and_flip(x, centre, np.array([False, False]), p), x)
  np.testing.assert_array_equal(
    images.crop_and_flip(x, centre, np.array([True, True]), p), x[:, :, ::-1]
  )
  corner = images.crop_and_flip(x, np.zeros((2, 2), int), np.array([False, True]), p)
  # Shifted down-right by p: the first p rows and columns are padding (zeros).
  np.testing.assert_array_equal(corner[0, :p], 0)
  np.testing.assert_array_equal(corner[0, :, :p], 0)
  np.testing.assert_array_equal(corner[0, p:, p:], x[0, :-p, :-p])
  # Flipped after the crop: the padding columns end up on the right.
  np.testing.assert_array_equal(corner[1, :, -p:], 0)
  np.testing.assert_array_equal(corner[1, p:, :-p], x[1, :-p, :-p][:, ::-1])


def test_draw_crop_flip_ranges():
  offsets, flips = images.draw_crop_flip(np.random.default_rng(0), 4000, 4)
  assert offsets.min() == 0 and offsets.max() == 8
  np.testing.assert_array_equal(np.unique(offsets), np.arange(9))
  assert 0.45 < flips.mean() < 0.55


def test_normalise_per_channel():
  x, _ = _random_split(3, shape=(4, 4, 3))
  expected = (x / 255.0 - np.array(MEAN3)) / np.array(STD3)
  out = images.normalise(x, MEAN3, STD3)
  chex.assert_type(out, np.float32)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Batches.


def test_training_epoch_is_a_permutation_without_the_last_partial_batch():
  x, y = _random_split(100)
  batches = _pipeline(x, y)
  assert batches.batches_per_epoch == 12
  seen = list(batches.epoch(0))
  inputs = np.concatenate([b[0] for b in seen])
  labels = np.concatenate([b[1] for b in seen])
  chex.assert_shape(inputs, (96, 32, 32, 3))
  chex.assert_type(labels, np.int32)
  # Undo the normalisation to identify the examples: 96 distinct examples of the split.
  raw = np.rint((inputs * np.array(STD3) + np.array(MEAN3)) * 255).astype(np.uint8)
  index = {bytes(image): i for i, image in enumerate(x.reshape(100, -1))}
  picked = [index[bytes(r)] for r in raw.reshape(96, -1)]
  assert len(set(picked)) == 96
  np.testing.assert_array_equal(labels, y[picked])


def test_order_depends_on_seed_and_epoch_only():
  first = [b[1] for b in _batches(seed=3).epoch(2)]
  again = [b[1] for b in _batches(seed=3).epoch(2)]
  other_epoch = [b[1] for b in _batches(seed=3).epoch(3)]
  other_seed = [b[1] for b in _batches(seed=4).epoch(2)]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))


@pytest.mark.parametrize("train", [True, False])
def test_resume_mid_epoch_gives_identical_batches(train):
  batches = _batches(train=train, augment=train)
  full = list(batches.epoch(5))
  for start in (0, 1, 7, batches.batches_per_epoch - 1, batches.batches_per_epoch):
    resumed = list(_batches(train=train, augment=train).epoch(5, start=start))
    assert len(resumed) == len(full) - start
    for (xa, ya), (xb, yb) in zip(full[start:], resumed):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)


def test_augmentation_changes_training_inputs_not_labels():
  plain = list(_batches(augment=False).epoch(0))
  augmented = list(_batches(augment=True).epoch(0))
  for (xa, ya), (xb, yb) in zip(plain, augmented):
    np.testing.assert_array_equal(ya, yb)
    chex.assert_equal_shape([xa, xb])
    assert not np.array_equal(xa, xb)


def test_evaluation_counts_every_example_once_with_padding():
  x, y = _random_split(21)
  evaluation = _pipeline(x, y, train=False, seed=0)
  assert evaluation.batches_per_epoch == 3
  batches = list(evaluation.epoch(0))
  inputs = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  mask = valid_mask(labels)
  assert mask.sum() == 21 and not mask[21:].any()
  np.testing.assert_array_equal(labels[:21], y)
  np.testing.assert_array_equal(labels[21:], PAD_LABEL)
  np.testing.assert_array_equal(inputs[:21], images.normalise(x, MEAN3, STD3))
  np.testing.assert_array_equal(inputs[21:], 0.0)
  # The evaluation order does not depend on the epoch.
  np.testing.assert_array_equal(np.concatenate([b[1] for b in evaluation.epoch(7)]), labels)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_are_disjoint_and_cover_the_global_batch(train, process_count):
  single = list(_batches(count=45, train=train, augment=train).epoch(1))
  parts = [
    list(
      _batches(
        count=45, train=train, augment=train, process_index=p, process_count=process_count
      ).epoch(1)
    )
    for p in range(process_count)
  ]
  for part in parts:
    assert len(part) == len(single)
  for k, (x_global, y_global) in enumerate(single):
    chex.assert_shape(parts[0][k][0], (8 // process_count, 32, 32, 3))
    np.testing.assert_array_equal(np.concatenate([part[k][0] for part in parts]), x_global)
    np.testing.assert_array_equal(np.concatenate([part[k][1] for part in parts]), y_global)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(batch_size=6, process_count=4), "multiple of process_count 4"),
    (dict(process_index=2, process_count=2), "process_index 2"),
    (dict(seed=-1), "seed -1"),
    (dict(train=False, augment=True), "augmentation is for training"),
    (dict(count=5, batch_size=8), "fewer than one global batch"),
  ],
)
def test_bad_batching_arguments(kwargs, message):
  with pytest.raises(DataError, match=message):
    _batches(**kwargs)


def test_epoch_start_out_of_range():
  with pytest.raises(ValueError, match="start 13"):
    next(_batches().epoch(0, start=13))


# ------------------------------------------------------------------------------------------------
# Digits.


def test_digits_split_is_stratified_deterministic_and_a_partition():
  from sklearn.datasets import load_digits

  train, test = images.read_digits("train"), images.read_digits("test")
  chex.assert_shape(train.images, (1437, 8, 8, 1))
  chex.assert_shape(test.images, (360, 8, 8, 1))
  chex.assert_type([train.images, train.labels], [np.uint8, np.int32])
  again = images.read_digits("train")
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)
  # Train and test together are exactly the whole dataset (a partition of the 1,797 examples).
  full = load_digits()
  whole = np.concatenate(
    [np.round(full.images * 255 / 16).reshape(1797, -1), full.target[:, None]], axis=1
  ).astype(np.uint8)
  parts = [
    np.concatenate([s.images.reshape(len(s.labels), -1), s.labels[:, None]], axis=1)
    for s in (train, test)
  ]
  assert _rows(np.concatenate(parts).astype(np.uint8)) == _rows(whole)
  np.testing.assert_array_equal(np.bincount(test.labels), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])
  assert train.images.max() == 255


def test_digits_normalisation_constants_match_the_training_split():
  x = images.read_digits("train").images / 255.0
  spec = images.DATASETS["digits"]
  np.testing.assert_allclose([x.mean(), x.std()], [spec.mean[0], spec.std[0]], atol=1e-5)


def test_digits_through_the_registry():
  train = data.load("digits", "train", batch_size=64, train=True, seed=42)
  test = data.load("digits", "test", batch_size=64, train=False, seed=42)
  assert (train.num_classes, train.input_shape, train.time_major) == (10, (8, 8, 1), False)
  assert (train.batches_per_epoch, test.batches_per_epoch) == (22, 6)
  labels = np.concatenate([y for _, y in test.epoch(0)])
  assert valid_mask(labels).sum() == 360


def test_registry_rejects_unknown_names_and_splits():
  allowed = "allowed: " + ", ".join(sorted(data.LOADERS))
  assert {"digits", "fashion_mnist", "cifar10", "cifar100"} <= set(data.LOADERS)
  with pytest.raises(DataError, match=re.escape(allowed)):
    data.load("mnist", "train", batch_size=8, train=True, seed=0)
  with pytest.raises(DataError, match="unknown split 'validation'"):
    data.load("digits", "validation", batch_size=8, train=True, seed=0)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST.


@pytest.fixture(scope="module")
def fashion_mnist():
  return images.read_fashion_mnist("train"), images.read_fashion_mnist("test")


def test_fashion_mnist_real_files(fashion_mnist):
  train, test = fashion_mnist
  chex.assert_shape(train.images, (60000, 28, 28, 1))
  chex.assert_shape(test.images, (10000, 28, 28, 1))
  chex.assert_type([train.images, train.labels, test.labels], [np.uint8, np.int32, np.int32])
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))


def test_fashion_mnist_normalisation_constants_match_the_training_split(fashion_mnist):
  x = fashion_mnist[0].images
  spec = images.DATASETS["fashion_mnist"]
  mean = x.mean(dtype=np.float64) / 255
  std = np.sqrt((x.astype(np.float64) ** 2).mean() / 255**2 - mean**2)
  np.testing.assert_allclose([mean, std], [spec.mean[0], spec.std[0]], atol=1e-5)


def _idx_bytes(array, magic=None):
  ndim = array.ndim
  magic = (0x08 << 8 | ndim) if magic is None else magic
  return struct.pack(f">I{ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_fashion_mnist(
  root,
  split="train",
  count=5,
  labels=None,
  image_shape=(28, 28),
  image_bytes=None,
  label_bytes=None,
):
  x = np.arange(count * int(np.prod(image_shape)), dtype=np.int64).reshape((count,) + image_shape)
  x = (x % 256).astype(np.uint8)
  y = np.arange(count) % 10 if labels is None else np.asarray(labels)
  image_name, label_name = images._FASHION_MNIST_FILES[split]
  with gzip.open(root / image_name, "wb") as f:
    f.write(_idx_bytes(x) if image_bytes is None else image_bytes)
  with gzip.open(root / label_name, "wb") as f:
    f.write(_idx_bytes(y) if label_bytes is None else label_bytes)
  return x, y


def test_fashion_mnist_reads_written_idx_files(tmp_path):
  x, y = _write_fashion_mnist(tmp_path, "test", count=7)
  arrays = images.read_fashion_mnist("test", data_dir=tmp_path)
  np.testing.assert_array_equal(arrays.images[..., 0], x)
  np.testing.assert_array_equal(arrays.labels, y)


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path):
  with pytest.raises(DataError) as error:
    images.read_fashion_mnist("train", data_dir=tmp_path)
  assert f"looked in {tmp_path}" in str(error.value)
  assert "apt-get install dataset-fashion-mnist" in str(error.value)


def _labels_idx(count=5):
  return _idx_bytes(np.arange(count) % 10)


@pytest.mark.parametrize(
  "case, message",
  [
    ("bad_magic", "magic number 0x00000903, expected 0x00000803"),
    ("labels_as_images", "magic number 0x00000801, expected 0x00000803"),
    ("truncated_payload", "truncated: sizes"),
    ("trailing_bytes", "trailing bytes"),
    ("short_header", "truncated IDX header"),
    ("count_mismatch", "5 images but labels of shape"),
    ("label_range", r"labels span \[0, 12\], expected \[0, 10\)"),
    ("image_size", "expected \\[N, 28, 28, 1\\]"),
  ],
)
def test_fashion_mnist_malformed_files(tmp_path, case, message):
  good = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
  kwargs = {
    "bad_magic": dict(image_bytes=_idx_bytes(np.zeros((5, 28, 28)), magic=0x0903)),
    "labels_as_images": dict(image_bytes=_labels_idx()),
    "truncated_payload": dict(image_bytes=good[:-100]),
    "trailing_bytes": dict(image_bytes=good + b"\0"),
    "short_header": dict(image_bytes=good[:10]),
    "count_mismatch": dict(label_bytes=_labels_idx(4)),
    "label_range": dict(labels=[0, 1, 12, 3, 4]),
    "image_size": dict(image_shape=(27, 28)),
  }[case]
  _write_fashion_mnist(tmp_path, **kwargs)
  with pytest.raises(DataError, match=message):
    images.read_fashion_mnist("train", data_dir=tmp_path)


def test_fashion_mnist_broken_gzip_stream(tmp_path):
  _write_fashion_mnist(tmp_path)
  path = tmp_path / images._FASHION_MNIST_FILES["train"][0]
  path.write_bytes(path.read_bytes()[:-30])
  with pytest.raises(DataError, match="not a complete gzip file"):
    images.read_fashion_mnist("train", data_dir=tmp_path)
  path.write_bytes(b"not gzip at all")
  with pytest.raises(DataError, match="not a complete gzip file"):
    images.read_fashion_mnist("train", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# CIFAR through tensorflow-datasets.


def _write_array_record_cifar10(root, counts):
  """Writes synthetic CIFAR-10 with tfds' own Cifar10 features as array_record under ``root``.

  The same ``download_and_prepare(file_format="array_record")`` path as
  ``experiments.prepare_cifar``, with generated examples instead of the download; images are handed
  over as PIL images, which tfds stores as PNG without TensorFlow.
  """
  import PIL.Image

  written = {}

  class SyntheticCifar10(tfds.image_classification.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      return {split: self._generate(split, count) for split, count in counts.items()}

    def _generate(self, split, count):
      x, y = _random_split(count, seed=len(split))
      written[split] = (x, y)
      for i in range(count):
        yield (
          f"{split}{i}",
          {"id": f"{split}{i}", "image": PIL.Image.fromarray(x[i]), "label": int(y[i])},
        )

  SyntheticCifar10(data_dir=str(root), file_format="array_record").download_and_prepare()
  return written


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  return root, _write_array_record_cifar10(root, {"train": 40, "test": 13})


def _examples(x, y):
  return _rows(np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.uint8)], axis=1))


def test_cifar10_reads_prepared_array_record_without_tensorflow(cifar10_dir):
  import sys

  root, written = cifar10_dir
  for split, (x, y) in written.items():
    arrays = images.read_tfds_images(
      "cifar10", split, root, image_shape=(32, 32, 3), num_classes=10
    )
    chex.assert_type([arrays.images, arrays.labels], [np.uint8, np.int32])
    assert _examples(arrays.images, arrays.labels) == _examples(x, y)
  assert "tensorflow" not in sys.modules


def test_cifar10_end_to_end_from_array_record(cifar10_dir):
  root, written = cifar10_dir
  train = data.load("cifar10", "train", batch_size=8, train=True, seed=1, data_dir=str(root))
  test = data.load("cifar10", "test", batch_size=8, train=False, seed=1, data_dir=str(root))
  assert (train.num_classes, train.input_shape, train.batches_per_epoch) == (10, (32, 32, 3), 5)
  assert test.batches_per_epoch == 2
  x, y = next(train.epoch(0))
  chex.assert_shape(x, (8, 32, 32, 3))
  chex.assert_type([x, y], [np.float32, np.int32])
  # Augmented by default: padding pixels are black before normalisation, i.e. -mean/std after.
  padding_value = -np.array(images.DATASETS["cifar10"].mean) / images.DATASETS["cifar10"].std
  assert np.isclose(x, padding_value.astype(np.float32), atol=1e-6).all(axis=-1).any()
  labels = np.concatenate([y for _, y in test.epoch(0)])
  assert valid_mask(labels).sum() == 13
  assert sorted(labels[valid_mask(labels)]) == sorted(written["test"][1])


def _write_prepared_layout(root, name, version, splits, file_format="array_record"):
  folder = root / name / version
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text(json.dumps({"name": name, "version": version}))
  for split in splits:
    (folder / f"{name}-{split}.{file_format}-00000-of-00001").write_bytes(b"")
  return folder


def test_cifar100_end_to_end_on_tfds_mock_data(tmp_path):
  # mock_data replaces tfds.data_source with random examples of the dataset's features; the
  # prepared-folder check runs before tfds, so the test writes the layout it looks for.
  version = str(tfds.builder_cls("cifar100").VERSION)
  _write_prepared_layout(tmp_path, "cifar100", version, ["train", "test"])
  with tfds.testing.mock_data(num_examples=20):
    train = data.load(
      "cifar100",
      "train",
      batch_size=8,
      train=True,
      seed=0,
      data_dir=str(tmp_path),
      process_index=1,
      process_count=2,
    )
    test = data.load("cifar100", "test", batch_size=8, train=False, seed=0, data_dir=str(tmp_path))
  assert (train.num_classes, train.batches_per_epoch, test.batches_per_epoch) == (100, 2, 3)
  x, y = next(train.epoch(0))
  chex.assert_shape(x, (4, 32, 32, 3))
  assert ((y >= 0) & (y < 100)).all()
  assert valid_mask(np.concatenate([y for _, y in test.epoch(0)])).sum() == 20


def test_missing_cifar_offline_fails_fast_with_where_and_how(tmp_path, monkeypatch):
  attempts = []

  def unreachable(url):
    attempts.append(url)
    raise OSError("offline")

  monkeypatch.setattr(cifar_archive, "_open_url", unreachable)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
  with pytest.raises(DataError) as error:
    data.load("cifar10", "train", batch_size=8, train=True, seed=0)
  assert attempts == [cifar_archive.ARCHIVES["cifar10"].url]  # one try, no retry loop
  message = str(error.value)
  assert f"looked in {tmp_path / 'from_env'} for cifar10_npy/" in message
  assert "the archive cifar-10-python.tar.gz" in message
  with pytest.raises(DataError, match=f"looked in {tmp_path / 'explicit'} for cifar100_npy/"):
    data.load(
      "cifar100", "test", batch_size=8, train=False, seed=0, data_dir=str(tmp_path / "explicit")
    )
  assert not (tmp_path / "explicit").exists()


def test_cifar_prepared_in_another_format_or_version(tmp_path):
  version = str(tfds.builder_cls("cifar10").VERSION)
  _write_prepared_layout(tmp_path, "cifar10", version, ["train"], file_format="tfrecord")
  with pytest.raises(DataError, match="not in the array_record format"):
    images.read_tfds_images("cifar10", "train", tmp_path, image_shape=(32, 32, 3), num_classes=10)
  with pytest.raises(DataError, match="no split 'test'"):
    images.read_tfds_images("cifar10", "test", tmp_path, image_shape=(32, 32, 3), num_classes=10)
  _write_prepared_layout(tmp_path, "cifar100", "1.0.0", ["train"])
  with pytest.raises(DataError, match="prepared versions 1.0.0 .* reads version"):
    images.read_tfds_images("cifar100", "train", tmp_path, image_shape=(32, 32, 3), num_classes=100)
