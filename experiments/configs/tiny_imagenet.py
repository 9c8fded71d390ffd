"""Tiny-ImageNet (200 classes, 64x64, standard folder layout): ResNet-18 with the 3x3 stem and
max pooling, binary weights, T=4, online training. Variants: ``variants.VARIANTS``."""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "tiny_imagenet"
  c.model.stem = "tiny"
  return variants.apply(c, variant)
