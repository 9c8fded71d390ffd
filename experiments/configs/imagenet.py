"""ImageNet-1k (tfds imagenet2012, prepared from the manual download): ResNet-34 with the ImageNet
stem, ternary weights, T=4, online training. Variants: ``variants.VARIANTS``."""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "imagenet"
  c.model.name = "resnet34"
  c.model.stem = "imagenet"
  c.model.weights = "ternary"
  c.epochs = 100
  c.batch_size = 256
  c.learning_rate = 0.04
  c.compute_dtype = "bfloat16"
  c = variants.apply(c, variant)
  return c
