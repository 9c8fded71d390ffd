"""Defaults shared by every configuration (docs/model.md §4)."""

import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

from empf_jax import models

DEFAULT_NETWORK = "resnet18"


def model_config() -> ml_collections.ConfigDict:
  """``config.model``: every option of :class:`empf_jax.models.NetOptions` (its docstring says what
  each means) with its default, but those set from the data (``models.SET_FROM_DATA``).

  An option whose default is None is a typed placeholder, so that ``--config.model.stem=imagenet``
  overrides it with a value of the option's type.
  """
  m = ml_collections.ConfigDict()
  hints = typing.get_type_hints(models.NetOptions)
  for field in dataclasses.fields(models.NetOptions):
    if field.name in models.SET_FROM_DATA:
      continue
    default = DEFAULT_NETWORK if field.name == "name" else field.default
    if default is None:
      kind = next(t for t in typing.get_args(hints[field.name]) if t is not types.NoneType)
      m[field.name] = config_dict.placeholder(kind)
    else:
      m[field.name] = default
  return m


# Every training key: (default, meaning). The config page of the documentation is written from
# this table and from NetOptions' docstring (config.model), so each key is described here only.
TRAINING_KEYS: dict[str, tuple[object, str]] = {
  "dataset": ("cifar10", "the dataset (`experiments.input.LOADERS`)"),
  "data_dir": ("", "where the dataset lives; empty: the dataset's default location"),
  "augment": (True, "the dataset's training augmentation (random crop + flip for CIFAR)"),
  "mode": ("online", "training rule: online (T updates per batch), random_step or bptt"),
  "time_steps": (4, "T, the time steps per example"),
  "batch_size": (64, "examples per batch over all devices (a multiple of the device count)"),
  "epochs": (300, "training epochs"),
  "learning_rate": (0.01, "peak learning rate (SGD)"),
  "momentum": (0.9, "SGD momentum"),
  "nesterov": (True, "Nesterov momentum"),
  "weight_decay": (5e-4, "coupled L2 weight decay"),
  "decay_latent_weights": (True, "False: no weight decay on binary/ternary latent kernels"),
  "warmup_epochs": (5, "epochs of linear warm-up before the cosine decay"),
  "warmup_start": (0.01, "the warm-up's first learning rate as a fraction of the peak"),
  "label_smoothing": (0.1, "label smoothing of the cross-entropy targets"),
  "mix": (False, "mixup (alpha 0.8) or cutmix (alpha 1.0), one of them per batch"),
  "compute_dtype": ("float32", "float32 or bfloat16 (parameters stay float32)"),
  "seed": (42, "the one seed of all randomness (initialisation, order, augmentation, draws)"),
  "bn_recalibration_batches": (
    64,
    "BN re-estimation (beyond the paper): at every epoch end (and with --eval_only) reset the "
    "BatchNorm running averages and re-estimate them from this many training batches with the "
    "weights frozen, before the checkpoint; 0 keeps the running averages of training, which for "
    "binary weights trained online fit no single set of weights (docs/model.md §7)",
  ),
  # Harmless keys (train.HARMLESS_KEYS): they do not change the result and are left out of the
  # config fingerprint.
  "checkpoint_every_steps": (1000, "a checkpoint every this many batches (and at epoch ends)"),
  "keep_checkpoints": (3, "checkpoints kept, the newest"),
  "log_every_steps": (50, "a train record (metrics.jsonl, TensorBoard) every this many batches"),
  "eval_every_epochs": (1, "evaluate on the test split every this many epochs (and at the end)"),
  "progress": (True, "a progress bar on the console"),
  "input_workers": (
    -1,
    "worker processes making the input batches (grain); 0 or -1 (the default) for none: the "
    "datasets decoded from files (ImageNet, Tiny-ImageNet) then decode on one thread per CPU "
    "core of the training process (at most 32), the in-memory ones and the DVS frame cache make "
    "batches on one thread",
  ),
  "bn_check_batches": (
    64,
    "at every evaluation also evaluate with BatchNorm averages re-estimated from this many "
    "training batches (another order than the re-estimation), beside the stored ones, and write "
    "both to the metrics: the gap shows averages that do not fit the weights; 0: skip",
  ),
}


def base_config() -> ml_collections.ConfigDict:
  """The paper's setup: ResNet-18, T=4, binary weights, online rule, SGD 0.01, 300 epochs.

  ``config.model`` is :func:`model_config`; every other key is a key of :data:`TRAINING_KEYS`
  with its default.
  """
  c = ml_collections.ConfigDict()
  for key, (default, _) in TRAINING_KEYS.items():
    c[key] = default
  c.model = model_config()
  return c
