"""The paper's model variants as named presets, shared by the dataset configs.

``--config=experiments/configs/<dataset>.py:VARIANT`` with VARIANT a key of :data:`VARIANTS`;
:func:`describe` lists them with what each changes (the ``--help`` of the configs and the docs
read it, so the list is written here only).
"""

import ml_collections

VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
  "default": ("the dataset's own setting", {}),
  "ternary_parallel_4bit": (
    "ternary weights, 50 % parallel neurons, 4-bit spikes (ResNets only: parallel neurons "
    "replace the second neuron of each basic block)",
    {"model.weights": "ternary", "model.parallel": True, "model.spike_bits": 4},
  ),
  "membn_seca": ("Mem-BN and SECA-I", {"model.mem_bn": True, "model.seca": 1}),
  "lif": ("online LIF baseline", {"model.neuron": "lif"}),
  "bptt_lif": ("LIF trained by BPTT", {"model.neuron": "lif", "mode": "bptt"}),
  "random_step": ("one update per batch at a random time step", {"mode": "random_step"}),
  "float": ("full-precision weights", {"model.weights": "float"}),
}
"""Variant name -> (what it is, the config keys it sets)."""


def describe() -> str:
  """One line per variant: its name, what it is and the keys it sets."""
  lines = []
  for name, (meaning, changes) in VARIANTS.items():
    keys = ", ".join(f"{key}={value!r}" for key, value in changes.items()) or "no change"
    lines.append(f"{name}: {meaning} ({keys})")
  return "\n".join(lines)


def apply(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Applies a named variant to ``c`` in place and returns it.

  ``ternary_parallel_4bit`` needs a ResNet (parallel neurons exist only there); with another
  network the configuration check rejects it.
  """
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}")
  for key, value in VARIANTS[variant][1].items():
    *path, leaf = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[leaf] = value
  return c
