"""The paper's model variants as named presets, shared by the dataset configs."""

import ml_collections

VARIANTS = (
  "default",
  "ternary_parallel_4bit",
  "membn_seca",
  "lif",
  "bptt_lif",
  "random_step",
  "float",
)


def apply(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a named variant to ``c`` in place and returns it.

  ``ternary_parallel_4bit`` needs a ResNet (parallel neurons exist only there); with another
  network the configuration check rejects it.
  """
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}")
  if variant == "ternary_parallel_4bit":
    c.model.weights = "ternary"
    c.model.parallel = True
    c.model.spike_bits = 4
  elif variant == "membn_seca":
    c.model.mem_bn = True
    c.model.seca = 1
  elif variant == "lif":
    c.model.neuron = "lif"
  elif variant == "bptt_lif":
    c.model.neuron = "lif"
    c.mode = "bptt"
  elif variant == "random_step":
    c.mode = "random_step"
  elif variant == "float":
    c.model.weights = "float"
  return c
