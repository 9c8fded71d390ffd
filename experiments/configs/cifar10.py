"""CIFAR-10, ResNet-18, T=4, binary weights, online training (the paper's main setting).

Variants: ``--config=experiments/configs/cifar10.py:VARIANT`` with VARIANT a name of
``variants.VARIANTS`` (``experiments/configs/variants.py``, which says what each changes).
"""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "cifar10"
  return variants.apply(c, variant)
