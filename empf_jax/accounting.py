"""Model size accounting (docs/model.md §2): the paper's rule and the packed deployment size.

Works on concrete models and on abstract ones from ``nnx.eval_shape`` (only shapes are read), so
full-size networks never need to be allocated.

Paper rule: binary 0.25 byte per weight (2 bits, as the authors count), ternary 0.375 byte, float
4 bytes (stem, classifier, FC biases, SECA); BatchNorm and neuron scalars excluded; MB = 10^6 bytes.
Packed rule: binary 1 bit, ternary 2 bits, float 4 bytes.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from empf_jax.layers import BinaryWeight, FloatWeight, TernaryWeight

PAPER_BYTES = {BinaryWeight: 0.25, TernaryWeight: 0.375, FloatWeight: 4.0}
PACKED_BYTES = {BinaryWeight: 1 / 8, TernaryWeight: 2 / 8, FloatWeight: 4.0}
MEGABYTE = 1e6


def weight_counts(model: nnx.Module) -> dict[str, int]:
  """Number of binary, ternary and float weights of ``model`` (BN and neuron scalars excluded)."""
  return {
    kind.__name__: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, kind)))
    for kind in PAPER_BYTES
  }


def _megabytes(model: nnx.Module, rule: dict) -> float:
  counts = weight_counts(model)
  return sum(counts[kind.__name__] * size for kind, size in rule.items()) / MEGABYTE


def param_megabytes(model: nnx.Module) -> float:
  """Size in MB by the paper's rule (binary 2 bits, ternary 3 bits, float 32 bits per weight)."""
  return _megabytes(model, PAPER_BYTES)


def packed_megabytes(model: nnx.Module) -> float:
  """Size in MB packed for deployment (binary 1 bit, ternary 2 bits, float 32 bits per weight)."""
  return _megabytes(model, PACKED_BYTES)
