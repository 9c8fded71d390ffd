"""Sequential Fashion-MNIST (offline): each image fed as 4-row chunks, T=7 steps of 4x28 pixels,
so the network must carry information across steps; convnet_small, binary weights, online
training; accuracy is reported at the last step. Variants as in ``cifar10.py``."""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "sequential_fashion_mnist"
  c.augment = False
  c.model.name = "convnet_small"
  c.time_steps = 7
  c.batch_size = 64
  c.epochs = 10
  c.learning_rate = 0.1
  c.warmup_epochs = 1
  c.checkpoint_every_steps = 500
  return variants.apply(c, variant)
