"""Fashion-MNIST from the Debian package dataset-fashion-mnist (offline): convnet28, T=4,
binary weights, online training. Variants: ``variants.VARIANTS``.

convnet28 pools right after its full-precision first unit and flattens its 7x7 maps into the
classifier, so its compute goes to the binary units at 14x14 and 7x7 (docs/results.md).
"""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "fashion_mnist"
  c.augment = False
  c.model.name = "convnet28"
  c.batch_size = 128
  c.epochs = 12
  c.learning_rate = 0.05
  c.warmup_epochs = 1
  c.checkpoint_every_steps = 250
  return variants.apply(c, variant)
