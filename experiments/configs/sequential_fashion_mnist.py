"""Sequential Fashion-MNIST (offline): each image fed as 4-row chunks, T=7 steps of 4x28 pixels,
so the network must carry information across steps; otherwise the Fashion-MNIST setup
(convnet_small, binary weights, online training). Accuracy is reported at the last step.
Variants as in ``cifar10.py``."""

from experiments.configs import fashion_mnist


def get_config(variant: str = "default"):
  c = fashion_mnist.get_config(variant)
  c.dataset = "sequential_fashion_mnist"
  c.time_steps = 7
  return c
