"""CIFAR-100, ResNet-18, T=4, binary weights, online training.

Variants: ``variants.VARIANTS``.
"""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "cifar100"
  return variants.apply(c, variant)
