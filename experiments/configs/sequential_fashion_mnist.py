"""Sequential Fashion-MNIST (offline): each image fed as 4-row chunks, T=7 steps of 4x28 pixels,
so the network must carry information across steps. Accuracy is reported at the last step.

Network: ``mlp`` (each step's 112 pixels -> 512 float units -> 512 binary units -> classes, EM-PF
neurons), with per-step BatchNorm running averages (``model.step_stats``): the rows of step 1
and of step 4 have different statistics, and one shared running average would evaluate every
step with a mixture of them. Online training, binary weights, as the other configs.
Variants: ``variants.VARIANTS``.
"""

from experiments.configs import fashion_mnist


def get_config(variant: str = "default"):
  c = fashion_mnist.get_config(variant)
  c.dataset = "sequential_fashion_mnist"
  c.time_steps = 7
  c.model.name = "mlp"
  c.model.width = 2.0
  c.model.step_stats = True
  c.batch_size = 64
  c.epochs = 10
  c.learning_rate = 0.05
  c.warmup_epochs = 0
  c.checkpoint_every_steps = 500
  return c
