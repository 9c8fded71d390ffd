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


def base_config() -> ml_collections.ConfigDict:
  """The paper's setup: ResNet-18, T=4, binary weights, online rule, SGD 0.01, 300 epochs."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.data_dir = ""  # empty: the dataset's default location
  c.augment = True  # the dataset's training augmentation (random crop + flip for CIFAR)

  c.model = model_config()

  c.mode = "online"  # online | random_step | bptt
  c.time_steps = 4
  c.batch_size = 64
  c.epochs = 300
  c.learning_rate = 0.01
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.decay_latent_weights = True  # False: no weight decay on binary/ternary latent kernels
  c.warmup_epochs = 5
  c.warmup_start = 0.01
  c.label_smoothing = 0.1
  c.mix = False  # mixup (alpha 0.8) or cutmix (alpha 1.0), one of them per batch
  c.compute_dtype = "float32"  # or bfloat16 (parameters stay float32)
  c.seed = 42
  # BN re-estimation (beyond the paper): at every epoch end (and with --eval_only) reset the
  # BatchNorm running averages and re-estimate them from this many training batches with the
  # weights frozen, before the checkpoint; 0 keeps the running averages of training, which for
  # binary weights trained online fit no single set of weights (docs/model.md §7, BENCHMARKS.md).
  c.bn_recalibration_batches = 64

  # Harmless keys: they do not change the result and are left out of the config fingerprint.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress = True
  # Worker processes making the input batches (grain); 0 or -1 (the default) for none: the
  # datasets decoded from files (ImageNet, Tiny-ImageNet) then decode on one thread per CPU core
  # of the training process (at most 32; faster than workers on 2 cores, BENCHMARKS.md §7), the
  # in-memory ones and the DVS frame cache make batches on one thread.
  c.input_workers = -1
  # At every evaluation also evaluate with BatchNorm averages re-estimated from this many
  # training batches (another order than the re-estimation above), beside the stored ones, and
  # write both to the metrics: the gap shows averages that do not fit the weights. 0: skip.
  c.bn_check_batches = 64
  return c
