"""Prepares CIFAR-10/100 for training ahead of the first run, without TensorFlow.

  python -m experiments.prepare_cifar [--data_dir=DIR] [--datasets=cifar10,cifar100]

The training program does the same on first use; this command is for preparing a data folder in
advance (a shared folder before a multi-host run, a machine that goes offline later). The official
archive is taken from ``data_dir`` (or ``data_dir/downloads/manual/``) if a copy lies there, else
downloaded; its MD5 is checked, and the arrays are written into ``data_dir/<name>_npy/`` (see
``experiments.input.cifar_archive``). A folder prepared already is left as it is.

``data_dir`` defaults to ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``, the folder the input
pipeline reads from (see ``experiments.input.images.tfds_data_dir``). Exit code 2 with one
``error:`` line when the data cannot be prepared (offline without an archive, a wrong checksum).
"""

from __future__ import annotations

from absl import app, flags

from experiments.cli import fail
from experiments.input import cifar_archive, images
from experiments.input.base import DataError

_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "Data folder; default $TFDS_DATA_DIR, else ~/tensorflow_datasets."
)
_DATASETS = flags.DEFINE_list("datasets", ["cifar10", "cifar100"], "Datasets to prepare.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [name for name in _DATASETS.value if name not in cifar_archive.ARCHIVES]
  if unknown:
    raise app.UsageError(
      f"unknown datasets {unknown}; supported: {', '.join(cifar_archive.ARCHIVES)}"
    )
  data_dir = images.tfds_data_dir(_DATA_DIR.value)
  for name in _DATASETS.value:
    try:
      folder = cifar_archive.prepare(name, data_dir)
    except DataError as error:
      fail(str(error))
    print(f"{name}: prepared in {folder}", flush=True)


if __name__ == "__main__":
  app.run(main)
