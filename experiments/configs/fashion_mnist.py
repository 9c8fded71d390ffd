"""Fashion-MNIST from the Debian package dataset-fashion-mnist (offline): convnet_small, T=4,
binary weights, online training. Variants as in ``cifar10.py``."""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "fashion_mnist"
  c.augment = False
  c.model.name = "convnet_small"
  c.batch_size = 64
  c.epochs = 10
  c.learning_rate = 0.1
  c.warmup_epochs = 1
  c.checkpoint_every_steps = 500
  return variants.apply(c, variant)
