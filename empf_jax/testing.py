"""Test utilities: randomise the state a fresh network hides bugs behind.

At initialisation every per-step neuron scalar is 0, every BN scale 1 and offset 0, every running
mean 0 and variance 1: equalities checked on such a network can pass with wrong indexing or a
missing term. :func:`randomize` replaces all of them with random values.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from empf_jax.layers import FixedNeuronScalar, NeuronParam, NormParam


def randomize(model: nnx.Module, key: jax.Array, *, scale: float = 0.5) -> nnx.Module:
  """Sets neuron scalars, BN/Mem-BN parameters and running statistics to random values in place.

  Neuron logits and gates ~ N(0, 1); BN scales ~ U(0.5, 1.5); offsets and running means ~
  N(0, scale); running variances ~ U(0.5, 2). Returns the model for chaining.
  """
  def draw(path, variable):
    name = path[-1] if path else ""
    k = jax.random.fold_in(key, zlib.crc32('/'.join(map(str, path)).encode()) % (2**31))
    shape, dtype = variable.shape, variable.dtype
    if isinstance(variable, (NeuronParam, FixedNeuronScalar)) or name in ("c", "d"):
      return jax.random.normal(k, shape, dtype)
    if name == "scale":
      return jax.random.uniform(k, shape, dtype, 0.5, 1.5)
    if name == "var":
      return jax.random.uniform(k, shape, dtype, 0.5, 2.0)
    return scale * jax.random.normal(k, shape, dtype)

  kinds = (NeuronParam, FixedNeuronScalar, NormParam, nnx.BatchStat)
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, kinds):
      variable[...] = draw(path, variable)
  return model


def flat_params(model: nnx.Module) -> jax.Array:
  """All trainable parameters of ``model`` concatenated into one float32 vector."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
