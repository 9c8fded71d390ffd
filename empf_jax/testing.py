"""Test utilities: randomise the state a fresh network hides bugs behind.

At initialisation every per-step neuron scalar is 0, every BN scale 1 and offset 0, every running
mean 0 and variance 1: equalities checked on such a network can pass with wrong indexing or a
missing term; and every latent binary weight starts positive, so a binarised kernel is one constant
per output channel. :func:`randomize` replaces all of them with random values.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from empf_jax.layers import (
  BinaryWeight,
  FixedNeuronScalar,
  FloatWeight,
  NeuronParam,
  NormParam,
  TernaryWeight,
)

WEIGHT_TAGS = (BinaryWeight, TernaryWeight, FloatWeight)


def _generator(key: jax.Array, path: tuple) -> np.random.Generator:
  """A NumPy generator seeded by ``key`` and a variable's path (independent draws per variable)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  seed = [int(v) for v in np.asarray(key).ravel()]
  return np.random.default_rng(seed + [zlib.crc32("/".join(map(str, path)).encode())])


def randomize(
  model: nnx.Module, key: jax.Array, *, scale: float = 0.5, kernels: bool = False
) -> nnx.Module:
  """Sets neuron scalars, BN/Mem-BN parameters and running statistics to random values in place.

  Neuron logits and gates ~ N(0, 1); BN scales ~ U(0.5, 1.5); offsets and running means ~
  N(0, scale); running variances ~ U(0.5, 2). With ``kernels``, every convolution kernel (latent
  binary/ternary or float) is also redrawn ~ N(0, 2 / fan_in): mixed signs and currents of order
  one, where the default latent initialisation gives every binary weight the sign +1 and tiny
  currents. The draws are made with NumPy, seeded by ``key`` and each variable's path, so no
  random-number kernel is compiled per shape. Returns the model for chaining.
  """

  def draw(path, variable):
    name = path[-1] if path else ""
    rng = _generator(key, path)
    shape = variable.shape
    if isinstance(variable, WEIGHT_TAGS):
      value = rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:-1]))
    elif isinstance(variable, (NeuronParam, FixedNeuronScalar)) or name in ("c", "d"):
      value = rng.standard_normal(shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    elif name == "var":
      value = rng.uniform(0.5, 2.0, shape)
    else:
      value = scale * rng.standard_normal(shape)
    return jnp.asarray(value, variable.dtype)

  kinds = (NeuronParam, FixedNeuronScalar, NormParam, nnx.BatchStat)
  for path, variable in nnx.iter_graph(model):
    is_kernel = kernels and isinstance(variable, WEIGHT_TAGS) and variable.ndim == 4
    if isinstance(variable, kinds) or is_kernel:
      variable[...] = draw(path, variable)
  return model


def flat_params(model: nnx.Module) -> jax.Array:
  """All trainable parameters of ``model`` concatenated into one float32 vector."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
