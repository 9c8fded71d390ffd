"""Input pipelines of ImageNet, Tiny-ImageNet, CIFAR10-DVS and sequential Fashion-MNIST.

Every test writes small files in the real on-disk formats (tfds array_record, the Tiny-ImageNet
folder layout, AEDAT 2.0 / 3.1) and checks decoding, geometry and batching against values worked
out by hand or by an independent loop. Nothing is downloaded.
"""

import io
import json
import struct
from pathlib import Path

import chex
import numpy as np
import pytest
from PIL import Image

from experiments.input import dvs, imagenet, images, pipeline, sequential, tiny_imagenet
from experiments.input.base import PAD_LABEL, DataError

FASHION_MNIST = Path(images.FASHION_MNIST_DIR)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt, **options)
  return buffer.getvalue()


def to_pixels(normalised: np.ndarray) -> np.ndarray:
  """Inverse of the ImageNet normalisation, back to the 0..255 scale."""
  return (normalised * np.asarray(imagenet.IMAGENET_STD) + np.asarray(imagenet.IMAGENET_MEAN)) * 255


def column_ramp(height: int, width: int, slope: float) -> np.ndarray:
  """uint8 RGB image whose every pixel of column c is round(slope c)."""
  row = np.round(slope * np.arange(width)).astype(np.uint8)
  return np.repeat(np.broadcast_to(row[None, :, None], (height, width, 1)), 3, axis=2).copy()


# --------------------------------------------------------------------------------------------------
# Batching shared by the file-backed pipelines.


def batch_plan(num_examples, batch_size, **order):
  """``pipeline.epoch_order`` cut into global batches: [batches, batch_size]."""
  return pipeline.epoch_order(num_examples, batch_size, **order).reshape(-1, batch_size)


def test_epoch_order_training_is_a_seeded_permutation_without_the_tail():
  plan = batch_plan(23, 4, train=True, seed=3, epoch=1)
  chex.assert_shape(plan, (5, 4))
  assert len(set(plan.ravel().tolist())) == 20 and plan.min() >= 0 and plan.max() < 23
  np.testing.assert_array_equal(plan, batch_plan(23, 4, train=True, seed=3, epoch=1))
  assert not np.array_equal(plan, batch_plan(23, 4, train=True, seed=3, epoch=2))


def test_epoch_order_evaluation_keeps_order_and_pads_the_last_batch():
  plan = batch_plan(10, 4, train=False, seed=0, epoch=0)
  np.testing.assert_array_equal(plan.ravel(), list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(batch_plan(8, 4, train=False, seed=0, epoch=0).ravel(), range(8))


def test_epoch_order_is_the_order_of_the_in_memory_pipeline():
  count, batch = 12, 4
  pixels = np.zeros((count, 2, 2, 1), np.uint8)
  labels = np.arange(count, dtype=np.int32)
  arrays = pipeline.GrainBatches(
    images.ArrayReader(pixels, labels, mean=(0.0,), std=(1.0,)),
    num_classes=count,
    batch_size=batch,
    train=True,
    seed=5,
  )
  seen = np.stack([y for _, y in arrays.epoch(2)])
  np.testing.assert_array_equal(seen, batch_plan(count, batch, train=True, seed=5, epoch=2))


def toy_pipeline(
  count, *, train, batch_size=4, process_index=0, process_count=1, augment=True, **options
):
  """Example i is the constant i + u with u ~ U(0, 1) from its generator (0 without one)."""

  def example(index, rng):
    noise = 0.0 if rng is None else rng.random()
    return np.full((2, 3), index + noise, np.float32), index

  return pipeline.GrainBatches(
    pipeline.ExampleReader(example, count, (2, 3)),
    num_classes=count,
    batch_size=batch_size,
    train=train,
    seed=7,
    augment=augment and train,
    process_index=process_index,
    process_count=process_count,
    **options,
  )


def test_record_batches_processes_split_each_global_batch_and_resume_exactly():
  single = list(toy_pipeline(10, train=True).epoch(1))
  halves = [
    list(toy_pipeline(10, train=True, process_index=p, process_count=2).epoch(1)) for p in range(2)
  ]
  assert len(single) == 2 and all(len(h) == 2 for h in halves)
  for k, (x, y) in enumerate(single):
    chex.assert_shape(x, (4, 2, 3))
    chex.assert_type([x, y], [np.float32, np.int32])
    np.testing.assert_array_equal(y, np.concatenate([halves[0][k][1], halves[1][k][1]]))
    # The augmentation of an example does not depend on the number of processes.
    np.testing.assert_array_equal(x, np.concatenate([halves[0][k][0], halves[1][k][0]]))
    np.testing.assert_array_equal(np.floor(x[:, 0, 0]), y)
  resumed = list(toy_pipeline(10, train=True).epoch(1, start=1))
  np.testing.assert_array_equal(resumed[0][0], single[1][0])
  assert len({int(v) for _, y in single for v in y}) == 8


def test_worker_processes_deliver_the_batches_of_one_process_in_order():
  single = list(toy_pipeline(16, train=True).epoch(3))
  resumed = list(toy_pipeline(16, train=True, num_workers=2).epoch(3, start=1))
  assert len(resumed) == len(single) - 1 == 3
  for (x, y), (xw, yw) in zip(single[1:], resumed):
    chex.assert_type([xw, yw], [np.float32, np.int32])
    np.testing.assert_array_equal(xw, x)
    np.testing.assert_array_equal(yw, y)


@pytest.mark.parametrize("train", [True, False])
def test_threads_deliver_the_batches_of_one_thread_in_order(train):
  single = list(toy_pipeline(30, train=train).epoch(2))
  threaded = list(toy_pipeline(30, train=train, num_threads=3).epoch(2, start=1))
  assert len(threaded) == len(single) - 1 > 3
  for (x, y), (xt, yt) in zip(single[1:], threaded):
    np.testing.assert_array_equal(xt, x)
    np.testing.assert_array_equal(yt, y)
  with pytest.raises(DataError, match="num_threads 0 must be at least 1"):
    toy_pipeline(30, train=train, num_threads=0)


def test_record_batches_evaluation_counts_every_example_once():
  batches = [
    list(toy_pipeline(7, train=False, process_index=p, process_count=2).epoch(0)) for p in range(2)
  ]
  labels = np.concatenate([y for process in batches for _, y in process])
  real = labels[labels != PAD_LABEL]
  assert sorted(real.tolist()) == list(range(7))
  assert (labels == PAD_LABEL).sum() == 1
  for process in batches:
    for x, y in process:
      np.testing.assert_array_equal(x[y == PAD_LABEL], 0.0)
      np.testing.assert_array_equal(x[y != PAD_LABEL][:, 0, 0], y[y != PAD_LABEL])


def test_record_batches_report_broken_examples_and_bad_arguments():

  def broken(index, rng):
    raise OSError("truncated file")

  batches = pipeline.GrainBatches(
    pipeline.ExampleReader(broken, 4, (1,)), num_classes=2, batch_size=2, train=False, seed=0
  )
  with pytest.raises(DataError, match="example 0: truncated file"):
    next(batches.epoch(0))
  with pytest.raises(DataError, match="fewer|global batch"):
    toy_pipeline(3, train=True)
  with pytest.raises(DataError, match="multiple of process_count"):
    toy_pipeline(12, train=True, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="start"):
    toy_pipeline(12, train=True).epoch(0, start=4)


# --------------------------------------------------------------------------------------------------
# ImageNet preprocessing.


def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = imagenet.random_resized_crop_box(375, 500, rng)
    assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
    assert 0.08 * 0.97 <= h * w / (375 * 500) <= 1.0
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_random_resized_crop_box_falls_back_to_the_centred_widest_allowed_box():
  # Width 10, height 1000: no box of aspect >= 3/4 and area >= 8% fits, every attempt fails.
  box = imagenet.random_resized_crop_box(1000, 10, np.random.default_rng(0))
  assert box == ((1000 - 13) // 2, 0, 13, 10)  # w = 10, h = round(10 / (3/4)) = 13


def test_eval_image_is_the_exact_centre_crop_when_the_short_side_is_256():
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)
  out = imagenet.eval_image(encode(pixels))
  chex.assert_shape(out, (224, 224, 3))
  chex.assert_type(out, np.float32)
  # left = round((300 - 224) / 2) = 38, top = 16.
  np.testing.assert_allclose(to_pixels(out), pixels[16:240, 38:262], atol=1e-3)


def test_eval_image_resizes_the_short_side_then_crops_the_centre():
  # 512x600 -> 256x300 (factor 2): output column j samples input column 2 (j + 38) + 1/2.
  pixels = column_ramp(512, 600, 0.4)
  out = to_pixels(imagenet.eval_image(encode(pixels)))
  expected = 0.4 * (2 * (np.arange(224) + 38) + 0.5)
  np.testing.assert_allclose(out, np.broadcast_to(expected[None, :, None], out.shape), atol=1.01)


def test_train_image_resamples_the_drawn_box_and_flips_with_the_drawn_coin():
  height, width, slope = 300, 400, 0.6
  data = encode(column_ramp(height, width, slope))
  flips = []
  for seed in range(12):
    out = imagenet.train_image(data, np.random.default_rng(seed))
    chex.assert_shape(out, (224, 224, 3))
    replay = np.random.default_rng(seed)
    _, left, _, w = imagenet.random_resized_crop_box(height, width, replay)
    flipped = replay.random() < 0.5
    flips.append(flipped)
    # Output column j samples input column left + (j + 1/2) w / 224 - 1/2.
    expected = slope * (left + (np.arange(224) + 0.5) * w / 224 - 0.5)
    if flipped:
      expected = expected[::-1]
    # Edge columns also see the clamped image border; compare the inner ones.
    np.testing.assert_allclose(
      to_pixels(out)[:, 4:-4], np.broadcast_to(expected[None, 4:-4, None], (224, 216, 3)), atol=1.6
    )
  assert any(flips) and not all(flips)


def test_train_image_decodes_large_jpegs_at_reduced_scale_in_the_right_place():
  # Large boxes of a 1600x1200 JPEG are decoded at 1/2 to 1/8 scale; the box must still map to
  # the same image content.
  height, width, slope = 1200, 1600, 0.15
  data = encode(column_ramp(height, width, slope), "JPEG", quality=95)
  for seed in range(6):
    out = imagenet.train_image(data, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    _, left, _, w = imagenet.random_resized_crop_box(height, width, replay)
    expected = slope * (left + (np.arange(224) + 0.5) * w / 224 - 0.5)
    if replay.random() < 0.5:
      expected = expected[::-1]
    np.testing.assert_allclose(
      to_pixels(out)[:, 8:-8], np.broadcast_to(expected[None, 8:-8, None], (224, 208, 3)), atol=4.0
    )


# --------------------------------------------------------------------------------------------------
# ImageNet through a real tfds array_record folder.


def write_imagenet(data_dir: Path, split_sizes: dict[str, int], file_format="array_record"):
  """A genuine tfds ``imagenet2012`` folder; example i of a split has label 3 i + 1."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format=file_format)
  folder = Path(builder.data_dir)
  folder.mkdir(parents=True)
  splits, payloads = [], {}
  for split, count in split_sizes.items():
    payloads[split] = []
    if file_format == "array_record":
      writer = array_record_module.ArrayRecordWriter(
        str(folder / f"imagenet2012-{split}.array_record-00000-of-00001"), "group_size:1"
      )
      for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        data = encode(pixels, "JPEG", quality=90)
        payloads[split].append(data)
        writer.write(
          builder.info.features.serialize_example(
            {"image": data, "label": 3 * i + 1, "file_name": f"{split}_{i}.JPEG"}
          )
        )
      writer.close()
    template = tfds.core.ShardedFileTemplate(
      data_dir=folder, dataset_name="imagenet2012", split=split, filetype_suffix=file_format
    )
    splits.append(
      tfds.core.SplitInfo(
        name=split, shard_lengths=[count], num_bytes=0, filename_template=template
      )
    )
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(folder)
  return payloads


def test_imagenet_reads_tfds_array_record_and_preprocesses_every_example(tmp_path):
  payloads = write_imagenet(tmp_path, {"train": 6, "validation": 5})
  test = imagenet.load(
    "test", batch_size=4, train=False, seed=0, data_dir=str(tmp_path), num_workers=1
  )  # a worker process unpickles the tfds data source
  assert (test.num_classes, test.input_shape, test.time_major) == (1000, (224, 224, 3), False)
  batches = list(test.epoch(0))
  assert len(batches) == 2 == test.batches_per_epoch
  labels = np.concatenate([y for _, y in batches])
  np.testing.assert_array_equal(labels, [1, 4, 7, 10, 13, PAD_LABEL, PAD_LABEL, PAD_LABEL])
  inputs = np.concatenate([x for x, _ in batches])
  for i, data in enumerate(payloads["validation"]):
    np.testing.assert_array_equal(inputs[i], imagenet.eval_image(data))

  train = [
    imagenet.load(
      "train",
      batch_size=4,
      train=True,
      seed=1,
      data_dir=str(tmp_path),
      process_index=p,
      process_count=2,
      num_workers=0,
    )
    for p in range(2)
  ]
  assert train[0].batches_per_epoch == 1
  ((x0, y0),) = train[0].epoch(0)
  ((x1, y1),) = train[1].epoch(0)
  chex.assert_shape([x0, x1], (2, 224, 224, 3))
  assert len(set(y0.tolist()) | set(y1.tolist())) == 4
  assert set(y0.tolist()) | set(y1.tolist()) <= {1, 4, 7, 10, 13, 16}


def test_imagenet_missing_or_unusable_data_is_a_clear_error_at_once(tmp_path):
  with pytest.raises(DataError, match=f"no imagenet2012 folder in {tmp_path}.*tfds build"):
    imagenet.load("train", batch_size=2, train=True, seed=0, data_dir=str(tmp_path))
  (tmp_path / "imagenet2012").mkdir()
  with pytest.raises(DataError, match="not prepared.*--file_format=array_record"):
    imagenet.load("train", batch_size=2, train=True, seed=0, data_dir=str(tmp_path))
  other = tmp_path / "tfrecord"
  write_imagenet(other, {"train": 3}, file_format="tfrecord")
  with pytest.raises(DataError, match="stored as tfrecord.*convert_format"):
    imagenet.load("train", batch_size=2, train=True, seed=0, data_dir=str(other))
  with pytest.raises(DataError, match="unknown split 'validation'"):
    imagenet.load("validation", batch_size=2, train=False, seed=0, data_dir=str(other))


# --------------------------------------------------------------------------------------------------
# Tiny-ImageNet.


TINY_WNIDS = ["n03000003", "n01000001", "n02000002"]  # listed unsorted on purpose
TINY_COLOURS = {"n01000001": (200, 30, 30), "n02000002": (30, 200, 30), "n03000003": (30, 30, 200)}


def write_tiny_imagenet(root: Path, per_class: int = 2) -> list[str]:
  """The tiny-imagenet-200 layout with solid-colour JPEGs; returns the val wnids in file order."""
  (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
  (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
  for wnid in TINY_WNIDS:
    folder = root / "train" / wnid / "images"
    folder.mkdir(parents=True)
    for k in range(per_class):
      pixels = np.full((64, 64, 3), TINY_COLOURS[wnid], np.uint8)
      (folder / f"{wnid}_{k}.JPEG").write_bytes(encode(pixels, "JPEG", quality=95))
  val_wnids = ["n02000002", "n03000003", "n01000001", "n02000002"]
  (root / "val" / "images").mkdir(parents=True)
  lines = []
  for i, wnid in enumerate(val_wnids):
    pixels = np.full((64, 64, 3), TINY_COLOURS[wnid], np.uint8)
    if i == 3:  # a grey image, as some Tiny-ImageNet files are
      pixels = np.full((64, 64), 90, np.uint8)
    (root / "val" / "images" / f"val_{i}.JPEG").write_bytes(encode(pixels, "JPEG", quality=95))
    lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  return val_wnids


def test_tiny_imagenet_labels_are_indices_in_the_sorted_wnids(tmp_path):
  val_wnids = write_tiny_imagenet(tmp_path)
  order = sorted(TINY_WNIDS)
  test = tiny_imagenet.load(
    "test", batch_size=3, train=False, seed=0, data_dir=str(tmp_path), num_workers=0
  )
  assert (test.num_classes, test.input_shape) == (3, (64, 64, 3))
  batches = list(test.epoch(0))
  labels = np.concatenate([y for _, y in batches])
  inputs = np.concatenate([x for x, _ in batches])
  np.testing.assert_array_equal(labels[:4], [order.index(w) for w in val_wnids])
  np.testing.assert_array_equal(labels[4:], [PAD_LABEL, PAD_LABEL])
  for i, wnid in enumerate(val_wnids[:3]):
    np.testing.assert_allclose(to_pixels(inputs[i]).mean(axis=(0, 1)), TINY_COLOURS[wnid], atol=3.0)
  np.testing.assert_allclose(to_pixels(inputs[3]), 90.0, atol=2.0)  # grey -> RGB

  train = tiny_imagenet.load(
    "train", batch_size=2, train=True, seed=4, data_dir=str(tmp_path), augment=False, num_workers=0
  )
  for x, y in train.epoch(0):
    for image, label in zip(x, y):
      np.testing.assert_allclose(
        to_pixels(image).mean(axis=(0, 1)), TINY_COLOURS[order[label]], atol=3.0
      )


def test_tiny_imagenet_augmentation_is_the_shared_crop_and_flip(tmp_path):
  write_tiny_imagenet(tmp_path, per_class=1)
  batches = tiny_imagenet.load(
    "train", batch_size=3, train=True, seed=2, data_dir=str(tmp_path), num_workers=0
  )
  ((x, _),) = batches.epoch(5)
  plan = batch_plan(3, 3, train=True, seed=2, epoch=5)[0]
  paths, _ = tiny_imagenet.list_split(tmp_path, "train", sorted(TINY_WNIDS))
  for k, index in enumerate(plan):
    rng = np.random.default_rng(np.random.SeedSequence((2, 1, 5, int(index))))
    offsets, flips = images.draw_crop_flip(rng, 1, 4)
    expected = images.crop_and_flip(
      tiny_imagenet.read_image(paths[index])[None], offsets, flips, 4
    )[0]
    np.testing.assert_allclose(to_pixels(x[k]), expected, atol=1e-3)


def test_tiny_imagenet_missing_or_malformed_layout_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="wnids.txt.*tiny-imagenet-200"):
    tiny_imagenet.load("train", batch_size=2, train=True, seed=0, data_dir=str(tmp_path))
  write_tiny_imagenet(tmp_path)
  annotations = tmp_path / "val" / "val_annotations.txt"
  annotations.write_text(annotations.read_text() + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
  with pytest.raises(DataError, match="val_annotations.txt:5"):
    tiny_imagenet.load("test", batch_size=2, train=False, seed=0, data_dir=str(tmp_path))
  for file in (tmp_path / "train" / "n02000002" / "images").iterdir():
    file.unlink()
  (tmp_path / "train" / "n02000002" / "images").rmdir()
  with pytest.raises(DataError, match="missing class folder"):
    tiny_imagenet.load("train", batch_size=2, train=True, seed=0, data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# CIFAR10-DVS.


def write_aedat2(path: Path, t, x, y, polarity, external=()):
  """AEDAT 2.0 DVS128 file; (x, y) with the origin at the upper left, as ``read_aedat`` returns."""
  y_up = 127 - np.asarray(y)
  address = (y_up << 8) | (np.asarray(x) << 1) | np.asarray(polarity)
  address[list(external)] |= 1 << 15
  header = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# AEChip: DVS128\r\n"
  body = np.stack([address, np.asarray(t)], axis=1).astype(">u4").tobytes()
  path.write_bytes(header + body)


def packet(kind, words, overflow=0):
  words = np.asarray(words, "<u4").reshape(-1, 2)
  return (
    struct.pack("<hhiiiiii", kind, 0, 8, 4, overflow, len(words), len(words), len(words))
    + words.tobytes()
  )


def test_read_aedat2_decodes_dvs128_addresses_and_drops_external_events(tmp_path):
  path = tmp_path / "a.aedat"
  write_aedat2(
    path,
    t=[5, 9, 12, 20],
    x=[0, 127, 3, 40],
    y=[0, 5, 127, 64],
    polarity=[1, 0, 1, 1],
    external=[2],
  )
  events = dvs.read_aedat(path)
  np.testing.assert_array_equal(events.t, [5, 9, 20])
  np.testing.assert_array_equal(events.x, [0, 127, 40])
  np.testing.assert_array_equal(events.y, [0, 5, 64])
  np.testing.assert_array_equal(events.polarity, [1, 0, 1])


def test_read_aedat31_reads_polarity_packets_only(tmp_path):
  def word(x, y, p, valid=1):
    return (x << 17) | (y << 2) | (p << 1) | valid

  body = (
    packet(0, [[7, 1]])  # a special event packet, skipped
    + packet(1, [[word(3, 4, 1), 10], [word(9, 9, 0, valid=0), 11], [word(100, 2, 0), 12]])
    + packet(1, [[word(5, 6, 0), 3]], overflow=1)
  )
  header = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 0: DVS128\r\n#!END-HEADER\r\n"
  path = tmp_path / "b.aedat"
  path.write_bytes(header + body)
  events = dvs.read_aedat(path)
  np.testing.assert_array_equal(events.t, [10, 12, 3 + 2**31])
  np.testing.assert_array_equal(events.x, [3, 100, 5])
  np.testing.assert_array_equal(events.y, [4, 2, 6])
  np.testing.assert_array_equal(events.polarity, [1, 0, 0])
  path.write_bytes(header + body[:-4])
  with pytest.raises(DataError, match="does not fit"):
    dvs.read_aedat(path)
  path.write_bytes(b"#!AER-DAT4.0\r\n" + body)
  with pytest.raises(DataError, match="not an AEDAT 2.0 or 3.1"):
    dvs.read_aedat(path)


def reference_frames(events, time_steps, size=128):
  """Event-by-event loop: slice k = min(i // floor(N / T), T - 1), pixel (size-1-x, y)."""
  count = len(events.t)
  per_slice = count // time_steps
  frames = np.zeros((time_steps, size, size, 2))
  for i in range(count):
    k = min(i // per_slice, time_steps - 1) if per_slice else time_steps - 1
    frames[k, size - 1 - events.x[i], events.y[i], events.polarity[i]] += 1
  return frames


def test_event_frames_bins_equal_event_counts_into_exact_pixel_counts():
  rng = np.random.default_rng(0)
  count = 23  # T = 4: slices of 5, 5, 5 and 8 events
  x, y = rng.integers(0, 4, count), rng.integers(0, 4, count)  # many repeated pixels
  events = dvs.Events(np.arange(count), x, y, rng.integers(0, 2, count))
  frames = dvs.event_frames(events, time_steps=4)
  chex.assert_shape(frames, (4, 128, 128, 2))
  np.testing.assert_array_equal(frames, reference_frames(events, 4))
  np.testing.assert_array_equal(frames.sum(axis=(1, 2, 3)), [5, 5, 5, 8])
  # A hand-made stream: three ON events at sensor (x=2, y=7) in the first slice land at row 125.
  hand = dvs.Events(
    np.arange(4), np.array([2, 2, 2, 0]), np.array([7, 7, 7, 0]), np.array([1, 1, 1, 0])
  )
  frames = dvs.event_frames(hand, time_steps=2)
  assert frames[0, 125, 7, 1] == 2 and frames[1, 125, 7, 1] == 1 and frames[1, 127, 0, 0] == 1
  assert frames.sum() == 4


def test_event_frames_with_fewer_events_than_slices_fills_the_last_slice():
  events = dvs.Events(np.arange(3), np.array([0, 1, 2]), np.array([0, 0, 0]), np.array([0, 1, 0]))
  frames = dvs.event_frames(events, time_steps=4)
  np.testing.assert_array_equal(frames, reference_frames(events, 4))
  assert frames[3].sum() == 3
  with pytest.raises(DataError, match="no events"):
    dvs.event_frames(dvs.Events(*(np.zeros(0, np.int64),) * 4))
  with pytest.raises(DataError, match="outside the 128x128"):
    dvs.event_frames(dvs.Events(np.arange(1), np.array([128]), np.array([0]), np.array([0])))
  with pytest.raises(DataError, match="not all 0 or 1"):
    dvs.event_frames(dvs.Events(np.arange(1), np.array([1]), np.array([0]), np.array([2])))


def test_resize_bilinear_to_48_samples_at_half_pixel_centres():
  ramp = np.broadcast_to(np.arange(128.0)[None, None, :, None], (2, 128, 128, 2))
  out = dvs.resize_bilinear(ramp, 48)
  chex.assert_shape(out, (2, 48, 48, 2))
  chex.assert_type(out, np.float32)
  expected = (np.arange(48) + 0.5) * 128 / 48 - 0.5  # all inside [0, 127]: no clamping
  np.testing.assert_allclose(
    out, np.broadcast_to(expected[None, None, :, None], out.shape), rtol=1e-6
  )
  np.testing.assert_allclose(
    dvs.resize_bilinear(np.swapaxes(ramp, 1, 2), 48), np.swapaxes(out, 1, 2), rtol=1e-6
  )
  np.testing.assert_array_equal(dvs.resize_bilinear(np.full((1, 128, 128, 2), 3.0), 48), 3.0)
  # Corner samples mix the four nearest counts: output (0, 0) reads input (5/6, 5/6).
  impulse = np.zeros((1, 128, 128, 1))
  impulse[0, 1, 1, 0] = 36.0
  out = dvs.resize_bilinear(impulse, 48)
  assert out[0, 0, 0, 0] == pytest.approx(36.0 * (5 / 6) ** 2)


def test_resize_bilinear_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  frames = np.random.default_rng(0).poisson(1.0, (3, 128, 128, 2)).astype(np.float32)
  reference = (
    torch.nn.functional.interpolate(
      torch.from_numpy(frames).permute(0, 3, 1, 2),
      size=(48, 48),
      mode="bilinear",
      align_corners=False,
    )
    .permute(0, 2, 3, 1)
    .numpy()
  )
  # torch works out the sampling positions in float32: agreement to ~3e-5, not to the last bit.
  np.testing.assert_allclose(dvs.resize_bilinear(frames, 48), reference, rtol=1e-4, atol=1e-4)


def test_split_is_nine_to_one_per_class_fixed_and_disjoint():
  names = [f"cifar10_cat_{i}.aedat" for i in range(20)]
  shuffled = list(np.random.default_rng(0).permutation(names))
  train = dvs.split_names(shuffled, 3, "train")
  test = dvs.split_names(names, 3, "test")
  assert (len(train), len(test)) == (18, 2)
  assert not set(train) & set(test) and set(train) | set(test) == set(names)
  assert train == dvs.split_names(names, 3, "train")
  assert train == sorted(train, key=lambda n: int(n.split("_")[-1].split(".")[0]))
  assert dvs.split_names(names, 4, "test") != test or dvs.split_names(names, 5, "test") != test


def write_events_folder(root: Path, per_class: int = 3, events: int = 30):
  rng = np.random.default_rng(1)
  for name in dvs.CLASSES:
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      write_aedat2(
        root / name / f"cifar10_{name}_{i}.aedat",
        t=np.arange(events),
        x=rng.integers(0, 128, events),
        y=rng.integers(0, 128, events),
        polarity=rng.integers(0, 2, events),
      )


def test_frame_cache_is_built_once_and_read_afterwards(tmp_path):
  events_dir, cache = tmp_path / "events", tmp_path / "cache"
  write_events_folder(events_dir)
  assert dvs.build_frame_cache(events_dir, cache, num_threads=2) == 30
  assert json.loads((cache / "cache.json").read_text())["time_steps"] == 10
  cached = cache / "cat" / "cifar10_cat_2.npz"
  np.testing.assert_array_equal(
    np.load(cached)["frames"], dvs.recording_frames(events_dir / "cat" / "cifar10_cat_2.aedat")
  )
  stamp = cached.stat().st_mtime_ns
  assert dvs.build_frame_cache(events_dir, cache) == 30
  assert cached.stat().st_mtime_ns == stamp

  test = dvs.load("test", batch_size=4, train=False, seed=0, data_dir=str(cache))
  assert (test.input_shape, test.time_major, test.num_classes) == ((10, 48, 48, 2), True, 10)
  batches = list(test.epoch(0))
  labels = np.concatenate([y for _, y in batches])
  np.testing.assert_array_equal(labels[:10], np.arange(10))  # one test recording per class
  assert (labels[10:] == PAD_LABEL).all() and len(labels) == 12
  first = dvs.split_names([f"cifar10_airplane_{i}.npz" for i in range(3)], 0, "test")[0]
  np.testing.assert_array_equal(batches[0][0][0], np.load(cache / "airplane" / first)["frames"])

  train = dvs.load("train", batch_size=4, train=True, seed=3, data_dir=str(cache), augment=True)
  assert train.batches_per_epoch == 5  # 2 training recordings per class
  x, _ = next(train.epoch(1))
  chex.assert_shape(x, (4, 10, 48, 48, 2))
  index = int(batch_plan(20, 4, train=True, seed=3, epoch=1)[0, 0])
  paths = [
    cache / c / n
    for k, c in enumerate(dvs.CLASSES)
    for n in dvs.split_names([f"cifar10_{c}_{i}.npz" for i in range(3)], k, "train")
  ]
  rng = np.random.default_rng(np.random.SeedSequence((3, 1, 1, index)))
  np.testing.assert_array_equal(x[0], dvs.shift_and_flip(np.load(paths[index])["frames"], rng))


def test_shift_and_flip_is_a_flip_then_a_circular_shift():
  frames = np.random.default_rng(0).random((2, 6, 7, 2))
  rng = np.random.default_rng(11)
  out = dvs.shift_and_flip(frames, rng)
  replay = np.random.default_rng(11)
  flipped = replay.random() < 0.5
  a, b = replay.integers(-dvs.MAX_SHIFT, dvs.MAX_SHIFT + 1, size=2)
  source = frames[:, :, ::-1] if flipped else frames
  i, j = np.meshgrid(np.arange(6), np.arange(7), indexing="ij")
  np.testing.assert_array_equal(out, source[:, (i - a) % 6, (j - b) % 7])


def test_dvs_missing_cache_or_events_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="no frame cache.*python -m experiments.input.dvs"):
    dvs.load("train", batch_size=2, train=True, seed=0, data_dir=str(tmp_path))
  with pytest.raises(DataError, match="no .aedat files in .*airplane"):
    dvs.build_frame_cache(tmp_path / "nothing", tmp_path / "cache")
  events_dir = tmp_path / "events"
  write_events_folder(events_dir, per_class=1, events=12)
  dvs.build_frame_cache(events_dir, tmp_path / "cache", time_steps=4)
  with pytest.raises(DataError, match="use another cache folder"):
    dvs.build_frame_cache(events_dir, tmp_path / "cache")


# --------------------------------------------------------------------------------------------------
# Sequential Fashion-MNIST.


def test_to_row_chunks_feeds_rows_4t_to_4t_plus_3_at_step_t():
  batch = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
  chunks = sequential.to_row_chunks(batch)
  chex.assert_shape(chunks, (2, 7, 4, 28, 1))
  for t in range(7):
    for i in range(4):
      np.testing.assert_array_equal(chunks[:, t, i], batch[:, 4 * t + i])
  with pytest.raises(DataError, match="multiple of rows_per_step 4"):
    sequential.to_row_chunks(np.zeros((1, 30, 28, 1)))


@pytest.mark.skipif(
  not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
  reason="needs the dataset-fashion-mnist package",
)
def test_sequential_fashion_mnist_is_the_static_pipeline_cut_into_rows():
  seq = sequential.load("test", batch_size=64, train=False, seed=0)
  static = images.load("fashion_mnist", "test", batch_size=64, train=False, seed=0)
  assert (seq.input_shape, seq.time_major) == ((7, 4, 28, 1), True)
  assert seq.batches_per_epoch == static.batches_per_epoch == 157
  (xs, ys), (x, y) = next(seq.epoch(0, start=156)), next(static.epoch(0, start=156))
  np.testing.assert_array_equal(ys, y)
  assert (y == PAD_LABEL).sum() == 157 * 64 - 10000
  for t in range(7):
    np.testing.assert_array_equal(xs[:, t], x[:, 4 * t : 4 * t + 4])


def test_sequential_fashion_mnist_missing_files_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match=f"missing .*looked in {tmp_path}"):
    sequential.load("train", batch_size=8, train=True, seed=0, data_dir=str(tmp_path))
