"""scikit-learn's bundled digits (8x8, 10 classes; offline): convnet_small, T=4, binary, online.

Trains in about a minute on two CPU cores. Variants: ``variants.VARIANTS``.
"""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "digits"
  c.augment = False
  c.model.name = "convnet_small"
  c.batch_size = 32
  c.epochs = 12
  c.learning_rate = 0.1
  c.warmup_epochs = 1
  c.checkpoint_every_steps = 200
  c.log_every_steps = 10
  # An epoch has 44 batches: re-estimation from the first half, its check from the second.
  c.bn_recalibration_batches = 22
  c.bn_check_batches = 22
  return variants.apply(c, variant)
