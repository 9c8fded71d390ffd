"""One-time preparation of CIFAR-10/100 as tensorflow-datasets ``array_record`` data.

Training reads CIFAR through ``tfds.data_source`` (random access, no TensorFlow), which needs the
``array_record`` file format rather than tfds' default TFRecord. This program downloads the archives
and writes that format; it needs TensorFlow (tfds encodes the images with it) and internet access:

  pip install tensorflow-cpu
  python -m experiments.prepare_cifar --data_dir=~/tensorflow_datasets --datasets=cifar10,cifar100

``data_dir`` defaults to ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``, the folder the
input pipeline reads from (see ``experiments.input.images.tfds_data_dir``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from absl import app, flags

from experiments.input import images

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "tfds data folder; default $TFDS_DATA_DIR, else ~/tensorflow_datasets.")
_DATASETS = flags.DEFINE_list("datasets", ["cifar10", "cifar100"], "tfds names to prepare.")

SUPPORTED = ("cifar10", "cifar100")


def prepare(name: str, data_dir: Path) -> Path:
  """Downloads ``name`` and writes it as ``array_record`` under ``data_dir``; returns its folder."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return Path(builder.data_dir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [name for name in _DATASETS.value if name not in SUPPORTED]
  if unknown:
    raise app.UsageError(f"unknown datasets {unknown}; supported: {', '.join(SUPPORTED)}")
  if importlib.util.find_spec("tensorflow") is None:
    raise app.UsageError("preparing tfds image data needs TensorFlow: pip install tensorflow-cpu")
  data_dir = images.tfds_data_dir(_DATA_DIR.value)
  for name in _DATASETS.value:
    folder = prepare(name, data_dir)
    print(f"{name}: prepared in {folder}")


if __name__ == "__main__":
  app.run(main)
