"""CIFAR-10, ResNet-18, T=4, binary weights, online training (the paper's main setting).

Variants: ``--config=experiments/configs/cifar10.py:VARIANT`` with VARIANT one of
``default``, ``ternary_parallel_4bit`` (ternary + 50 % parallel + 4-bit spikes; ResNets only,
since parallel neurons replace the second neuron of each basic block),
``membn_seca`` (Mem-BN + SECA-I), ``lif`` (online LIF baseline), ``bptt_lif`` (LIF trained by BPTT).
"""

from experiments.configs import common, variants


def get_config(variant: str = "default"):
  c = common.base_config()
  c.dataset = "cifar10"
  return variants.apply(c, variant)
