"""CIFAR10-DVS (event frames, T=10 slices of equal event count, 2x48x48): VGG-SNN with binary
weights (first conv binary too), online training. Variants: ``variants.VARIANTS``."""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "cifar10_dvs"
  c.model.name = "vgg_snn"
  c.time_steps = 10
  c.epochs = 200
  return variants.apply(c, variant)
