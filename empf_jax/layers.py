"""Flax NNX layers: quantised convolutions, per-step BatchNorm, SECA and neuron modules.

Every layer takes time-major input ``[S, B, ...]`` holding the consecutive time steps
``t0, ..., t0 + S - 1``. ``S = 1`` with a carried neuron state is the step-by-step form that online
training uses; ``S = T`` from the zero state is the all-steps form (convolutions on the folded
S*B batch, BatchNorm statistics per step slice, neurons scanned over time). Both forms run the same
code, so they give the same numbers.

Parameters are tagged by what they are, which the size accounting (:mod:`empf_jax.accounting`)
reads:
:class:`BinaryWeight`, :class:`TernaryWeight`, :class:`FloatWeight`, :class:`NormParam` and
:class:`NeuronParam` are all ``nnx.Param``; BatchNorm running averages are ``nnx.BatchStat``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from empf_jax import neurons, ops
from empf_jax.quantize import WEIGHT_QUANTIZERS

BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5
LATENT_INIT_MAX = 1e-3
SECA_TAPS = 5


class BinaryWeight(nnx.Param):
  """Latent weight of a binarised (1-bit) synapse."""


class TernaryWeight(nnx.Param):
  """Latent weight of a ternarised (1.5-bit) synapse."""


class FloatWeight(nnx.Param):
  """Full-precision weight or bias (stem, classifier, SECA)."""


class NormParam(nnx.Param):
  """BatchNorm scale/offset and Mem-BN gates (excluded from the size rule)."""


class NeuronParam(nnx.Param):
  """Learnable per-step neuron scalar (decay or threshold logit)."""


class FixedNeuronScalar(nnx.Variable):
  """Per-step neuron scalar that is not trained (LIF without the learnable variant)."""


WEIGHT_KINDS = {"binary": BinaryWeight, "ternary": TernaryWeight, "float": FloatWeight}


def draw(
  sample: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...], **kwargs
) -> jax.Array:
  """``sample(key, shape, **kwargs)`` (a ``jax.random`` sampler), drawn flat and reshaped.

  The numbers are the same (JAX's threefry generator counts through the flattened shape), but
  XLA's CPU compiler takes seconds for a 4-D random op against a fraction of a second for a 1-D
  one, and eager initialisation compiles one per distinct shape: creating a ResNet-18 took ~37 s
  with 4-D draws.
  """
  return sample(key, (math.prod(shape),), **kwargs).reshape(shape)


def set_recording(model: nnx.Module, on: bool) -> None:
  """Turns the ``record`` flag of every recording module (convs, FC layers, neurons) on or off;
  recording modules then ``sow`` their inputs or spikes into ``nnx.Intermediate``."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and hasattr(node, "record"):
      node.record = on


def set_conv_backward(model: nnx.Module, backward: str) -> None:
  """Sets how every convolution of ``model`` is differentiated (``auto``, ``custom`` or
  ``native``: :func:`~empf_jax.ops.conv_backward_rule`); the model's next jitted step is traced
  with the new rule."""
  ops.conv_backward_rule(backward)  # checks the value
  for _, node in nnx.iter_graph(model):
    if isinstance(node, QConv):
      node.conv_backward = backward


def _recording(module: nnx.Module) -> bool:
  return getattr(module, "record", False)


class QConv(nnx.Module):
  """Bias-free 2-D convolution with binary, ternary or full-precision weights (HWIO kernel). ::

    y = conv(x, Q(W)),  Q(W) = alpha_o sign(W)                          (binary)
                        Q(W) = alpha (1[W_c > Delta] - 1[W_c < -Delta])   (ternary)
                        Q(W) = W                                        (float)

  (:func:`~empf_jax.quantize.binarize_ste`, :func:`~empf_jax.quantize.ternarize_ste`)

  with zero padding ``kernel_size // 2`` by default. Binary/ternary latent weights start uniform in
  [0, latent_init) with latent_init = 1e-3 (the authors' initialisation), or in
  [-latent_init, latent_init) with ``symmetric_init``; full-precision kernels are Kaiming-normal
  with fan_out. ``conv_backward`` chooses how the convolution is differentiated
  (:func:`~empf_jax.ops.conv_backward_rule`); it is part of the module, so a jitted step is traced
  again when it changes.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    weights: str = "binary",
    symmetric_init: bool = False,
    latent_init: float = LATENT_INIT_MAX,
    conv_backward: str = "auto",
    rngs: nnx.Rngs,
  ):
    ops.conv_backward_rule(conv_backward)  # checks the value
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.conv_backward = conv_backward
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.weights = weights
    self.record = False
    shape = (kernel_size, kernel_size, in_features, out_features)
    key = rngs.params()
    if weights == "float":
      std = math.sqrt(2.0 / (out_features * kernel_size * kernel_size))
      value = std * draw(jax.random.normal, key, shape)
    elif symmetric_init:
      value = draw(jax.random.uniform, key, shape, minval=-latent_init, maxval=latent_init)
    else:
      value = draw(jax.random.uniform, key, shape, maxval=latent_init)
    self.kernel = WEIGHT_KINDS[weights](value)

  def effective_kernel(self) -> jax.Array:
    """The kernel the forward pass uses (quantised with its straight-through estimator)."""
    kernel = self.kernel[...]
    if self.weights == "float":
      return kernel
    return WEIGHT_QUANTIZERS[self.weights](kernel)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Convolves time-major input [S, B, H, W, C_in] -> [S, B, H', W', C_out]."""
    if _recording(self):
      self.sow(nnx.Intermediate, "inputs", x)
    kernel = self.effective_kernel().astype(x.dtype)
    return ops.fold_time(
      x, lambda y: ops.conv2d(y, kernel, self.stride, self.padding, self.conv_backward)
    )


class Dense(nnx.Module):
  """Full-precision fully connected layer y = x W + b (PyTorch's default uniform initialisation)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.record = False
    bound = 1.0 / math.sqrt(in_features)
    self.kernel = FloatWeight(
      draw(
        jax.random.uniform, rngs.params(), (in_features, out_features), minval=-bound, maxval=bound
      )
    )
    self.bias = FloatWeight(
      jax.random.uniform(rngs.params(), (out_features,), minval=-bound, maxval=bound)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    if _recording(self):
      self.sow(nnx.Intermediate, "inputs", x)
    return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def unbiased(var: jax.Array, count: int) -> jax.Array:
  """Converts a biased variance over ``count`` samples to the unbiased one."""
  return var * (count / max(count - 1, 1))


def update_rows(stat: nnx.Variable, t0: jax.Array | int, new: jax.Array) -> None:
  """Per-step running averages [T, C]: rows t0..t0+S-1 each get r <- 0.9 r + 0.1 new[s]."""
  old = jax.lax.dynamic_slice_in_dim(stat[...], t0, new.shape[0])
  stat[...] = jax.lax.dynamic_update_slice_in_dim(
    stat[...], (1.0 - BN_MOMENTUM) * old + BN_MOMENTUM * new, t0, axis=0
  )


class StepBatchNorm(nnx.Module):
  """BatchNorm over channels with statistics of each time step's batch.

  Training: y = gamma (x - mu_t) / sqrt(var_t + eps) + beta with mu_t, var_t over the batch and
  spatial axes of step t's slice only (so no gradient crosses time through the statistics).
  Running averages: r <- 0.9 r + 0.1 stat_t once per step, in step order, unbiased variance.
  Evaluation uses the running averages.

  By default one set of running averages serves every step (docs/model.md §4). With
  ``time_steps=T`` each step t keeps its own running averages r_t <- 0.9 r_t + 0.1 stat_t and
  evaluation at step t uses r_t (an option beyond the method, docs/model.md §7, for inputs whose
  distribution changes with t, e.g. sequences fed chunk by chunk; gamma and beta stay shared).
  """

  def __init__(self, features: int, time_steps: int | None = None):
    self.features = features
    self.time_steps = time_steps
    stat_shape = (features,) if time_steps is None else (time_steps, features)
    self.scale = NormParam(jnp.ones((features,)))
    self.bias = NormParam(jnp.zeros((features,)))
    self.mean = nnx.BatchStat(jnp.zeros(stat_shape))
    self.var = nnx.BatchStat(jnp.ones(stat_shape))

  def affine(self) -> tuple[jax.Array, jax.Array]:
    """Evaluation-mode BN as y = A x + C, per channel ([C], or [T, C] with per-step statistics)."""
    a = self.scale[...] / jnp.sqrt(self.var[...] + BN_EPSILON)
    return a, self.bias[...] - a * self.mean[...]

  def __call__(self, x: jax.Array, t0: jax.Array | int = 0, *, train: bool) -> jax.Array:
    """Normalises time-major [S, B, ..., C] holding steps t0..t0+S-1; in training updates the
    running averages S times (per-step statistics: rows t0..t0+S-1 once each)."""
    steps = x.shape[0]
    shape = (steps,) + (1,) * (x.ndim - 2) + (self.features,)
    if not train:
      a, c = self.affine()
      if self.time_steps is not None:
        a = jax.lax.dynamic_slice_in_dim(a, t0, steps).reshape(shape)
        c = jax.lax.dynamic_slice_in_dim(c, t0, steps).reshape(shape)
      return x * a.astype(x.dtype) + c.astype(x.dtype)
    xf = x.astype(jnp.float32)
    y, mean, var = ops.batch_norm(xf, self.scale[...], self.bias[...], BN_EPSILON)  # mean: [S, C]
    var_unbiased = unbiased(var, math.prod(x.shape[1:-1]))
    if self.time_steps is None:
      # S sequential updates r <- (1 - m) r + m stat_s, written in closed form.
      weights = BN_MOMENTUM * (1.0 - BN_MOMENTUM) ** jnp.arange(steps - 1, -1, -1)
      decay = (1.0 - BN_MOMENTUM) ** steps
      self.mean[...] = decay * self.mean[...] + weights @ mean
      self.var[...] = decay * self.var[...] + weights @ var_unbiased
    else:
      update_rows(self.mean, t0, mean)
      update_rows(self.var, t0, var_unbiased)
    return y.astype(x.dtype)


class MemBN(nnx.Module):
  """Membrane BatchNorm: m_hat_t = sigma(c_t) BN_t(m_t) + sigma(d_t) m_t, one BN per time step.

  At inference BN_t(m) = A_t m + C_t, so
  m_hat_t = (sigma(d_t) + sigma(c_t) A_t) m_t + sigma(c_t) C_t
  (:meth:`folded`).
  """

  def __init__(self, time_steps: int, features: int):
    self.time_steps = time_steps
    self.features = features
    self.c = NormParam(jnp.zeros((time_steps,)))
    self.d = NormParam(jnp.zeros((time_steps,)))
    self.scale = NormParam(jnp.ones((time_steps, features)))
    self.bias = NormParam(jnp.zeros((time_steps, features)))
    self.mean = nnx.BatchStat(jnp.zeros((time_steps, features)))
    self.var = nnx.BatchStat(jnp.ones((time_steps, features)))

  def folded(self) -> tuple[jax.Array, jax.Array]:
    """Inference form m_hat_t = k_t * m_t + h_t; returns k [T, C] and h [T, C]."""
    gate_bn = jax.nn.sigmoid(self.c[...])[:, None]
    gate_id = jax.nn.sigmoid(self.d[...])[:, None]
    a = self.scale[...] / jnp.sqrt(self.var[...] + BN_EPSILON)
    c = self.bias[...] - a * self.mean[...]
    return gate_id + gate_bn * a, gate_bn * c

  def normalize(
    self, m: jax.Array, t: jax.Array, *, train: bool
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """m_hat_t for one step; in training also returns step t's batch mean and biased variance."""
    gate_bn = jax.nn.sigmoid(self.c[...][t])
    gate_id = jax.nn.sigmoid(self.d[...][t])
    if not train:
      k, h = self.folded()
      return m * k[t].astype(m.dtype) + h[t].astype(m.dtype), None
    mf = m.astype(jnp.float32)
    normed, mean, var = ops.batch_norm(mf[None], self.scale[...][t], self.bias[...][t], BN_EPSILON)
    normed, mean, var = normed[0], mean[0], var[0]
    return (gate_bn * normed + gate_id * mf).astype(m.dtype), (mean, var)

  def update(self, t0: jax.Array | int, means: jax.Array, variances: jax.Array, count: int) -> None:
    """Running averages of rows t0 .. t0+S-1, each updated once with its step's statistics."""
    update_rows(self.mean, t0, means)
    update_rows(self.var, t0, unbiased(variances, count))


class SECA(nnx.Module):
  """Spiking efficient channel attention: x * sigmoid(conv1d_5(GAP(x))) over channels.

  One 1-D convolution with 5 taps and a bias (6 parameters), zero-padded, shared over time.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(SECA_TAPS)
    self.kernel = FloatWeight(
      jax.random.uniform(rngs.params(), (SECA_TAPS,), minval=-bound, maxval=bound)
    )
    self.bias = FloatWeight(jax.random.uniform(rngs.params(), (), minval=-bound, maxval=bound))

  def gate(self, x: jax.Array) -> jax.Array:
    """The channel gate g = sigmoid(conv1d(GAP(x))) of shape [..., C]."""
    pooled = ops.spatial_mean(x.astype(jnp.float32))
    channels = pooled.shape[-1]
    half = SECA_TAPS // 2
    padded = jnp.pad(pooled, [(0, 0)] * (pooled.ndim - 1) + [(half, half)])
    kernel = self.kernel[...]
    mixed = sum(kernel[k] * padded[..., k : k + channels] for k in range(SECA_TAPS))
    return jax.nn.sigmoid(mixed + self.bias[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    """Gates [S, B, H, W, C] channel-wise."""
    return x * self.gate(x)[..., None, None, :].astype(x.dtype)


class Neuron(nnx.Module):
  """Base of the neuron modules: ``(currents [S,B,...], state, t0) -> (spikes, state)``."""

  stateful = True
  b: nnx.Variable  # threshold logits [T], in every neuron

  def init_state(self, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
    """The zero state for one time step's current of ``shape``."""
    return neurons.MembraneState(jnp.zeros(shape, dtype))

  def _record(self, spikes: jax.Array) -> None:
    if _recording(self):
      self.sow(nnx.Intermediate, "spikes", spikes)


class EMPFNeuron(Neuron):
  """EM-PF neuron layer (:func:`empf_jax.neurons.empf_step`), optionally Mem-BN and 4-bit spikes. ::

    m_t = sigma(a_t) sg(u_{t-1}) + I_t;  [m_t <- sigma(c_t) BN_t(m_t) + sigma(d_t) m_t  (Mem-BN)]
    s_t = relu(m_t - sigma(b_t));  u_t = m_t - s_t;  emitted spike s_t or Q_4(s_t) (4-bit).

  Per-step logits a_t, b_t start at 0 (decay and threshold 0.5).
  """

  def __init__(
    self, time_steps: int, features: int, *, mem_bn: bool = False, spike_bits: int | None = None
  ):
    self.time_steps = time_steps
    self.spike_bits = spike_bits
    self.record = False
    self.a = NeuronParam(jnp.zeros((time_steps,)))
    self.b = NeuronParam(jnp.zeros((time_steps,)))
    self.mem_bn = MemBN(time_steps, features) if mem_bn else None

  def params(self) -> neurons.EMPFParams:
    """The per-step logits (a, b) as the pure step function takes them."""
    return neurons.EMPFParams(self.a[...], self.b[...])

  def __call__(
    self,
    currents: jax.Array,
    state: neurons.MembraneState | None,
    t0: jax.Array | int,
    *,
    train: bool,
    online: bool = True,
  ) -> tuple[jax.Array, neurons.MembraneState]:
    """Steps t0..t0+S-1 of currents [S, B, ...] from ``state`` (None: u = 0).

    In training, Mem-BN normalises each step with that step's batch statistics and then updates
    its running averages of rows t0..t0+S-1; in evaluation it uses the folded form.
    Returns the spikes [S, B, ...] and the membrane after the last step.
    """
    if state is None:
      state = self.init_state(currents.shape[1:], currents.dtype)
    params = self.params()
    if self.mem_bn is None:

      def step(carry, current, t):
        return neurons.empf_step(
          params, carry, current, t, online=online, spike_bits=self.spike_bits
        )

      state, spikes = neurons.run_steps(step, state, currents, t0)
    else:

      def step(carry, current, t):
        membrane = neurons.empf_integrate(params, carry, current, t, online=online)
        membrane, moments = self.mem_bn.normalize(membrane, t, train=train)
        carry, spike = neurons.empf_fire(params, membrane, t, spike_bits=self.spike_bits)
        return carry, (spike, moments)

      state, (spikes, moments) = neurons.run_steps(step, state, currents, t0)
      if train:
        means, variances = moments
        self.mem_bn.update(t0, means, variances, count=math.prod(currents.shape[1:-1]))
    self._record(spikes)
    return spikes, state


class ParallelNeuron(Neuron):
  """Stateless EM-PF neuron s_t = relu(I_t - sigma(b_t)), all steps at once."""

  stateful = False

  def __init__(self, time_steps: int, *, spike_bits: int | None = None):
    self.time_steps = time_steps
    self.spike_bits = spike_bits
    self.record = False
    self.b = NeuronParam(jnp.zeros((time_steps,)))

  def init_state(self, shape: tuple[int, ...], dtype: Any = jnp.float32) -> neurons.NoState:
    return neurons.NoState()

  def __call__(
    self,
    currents: jax.Array,
    state: neurons.NoState | None,
    t0: jax.Array | int,
    *,
    train: bool,
    online: bool = True,
  ) -> tuple[jax.Array, neurons.NoState]:
    """s[i] = relu(I[i] - sigma(b[t0 + i])) for all S steps at once (no state to carry)."""
    spikes = neurons.parallel_all(
      neurons.ParallelParams(self.b[...]), currents, t0, spike_bits=self.spike_bits
    )
    self._record(spikes)
    return spikes, neurons.NoState()


class LIFNeuron(Neuron):
  """LIF baseline layer with soft reset (:func:`empf_jax.neurons.lif_step`)::

    m_t = sigma(a_t) sg(u_{t-1}) + I_t;  s_t = theta'_t H(m_t - theta'_t);  u_t = m_t - s_t,
    theta'_t = sigma(b_t) + 0.5,  dH/dx := max(1 - |x|, 0).

  Decay 0.5 and threshold 1.0 at start, per step; trained only when ``learnable``.
  """

  def __init__(self, time_steps: int, *, learnable: bool = False):
    self.time_steps = time_steps
    self.learnable = learnable
    self.record = False
    kind = NeuronParam if learnable else FixedNeuronScalar
    self.a = kind(jnp.zeros((time_steps,)))
    self.b = kind(jnp.zeros((time_steps,)))

  def __call__(
    self,
    currents: jax.Array,
    state: neurons.MembraneState | None,
    t0: jax.Array | int,
    *,
    train: bool,
    online: bool = True,
  ) -> tuple[jax.Array, neurons.MembraneState]:
    """Steps t0..t0+S-1 of currents [S, B, ...] from ``state`` (None: u = 0); spikes and state."""
    if state is None:
      state = self.init_state(currents.shape[1:], currents.dtype)
    params = neurons.EMPFParams(self.a[...], self.b[...])

    def step(carry, current, t):
      return neurons.lif_step(params, carry, current, t, online=online)

    state, spikes = neurons.run_steps(step, state, currents, t0)
    self._record(spikes)
    return spikes, state
