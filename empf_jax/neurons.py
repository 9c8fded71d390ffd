"""Spiking neurons as pure step functions (docs/model.md §1).

Every neuron is ``step(params, state, current, t) -> (state, spike)`` over a small NamedTuple state,
and the multi-step form is ``jax.lax.scan`` of that step over time-major input ``[S, B, ...]``
(:func:`run_steps`). Per-step parameters are vectors indexed by the time step ``t`` (0-based here,
``t = 1..T`` in the paper).

EM-PF (one layer, one step, ``sg`` = stop_gradient, ``sigma`` = sigmoid)::

    lambda_t = sigma(a_t),  theta_t = sigma(b_t)
    m_t = lambda_t * sg(u_{t-1}) + I_t
    s_t = relu(m_t - theta_t)
    u_t = m_t - s_t = min(m_t, theta_t)

LIF baseline (soft reset, Heaviside spike with a triangle surrogate)::

    lambda_t = sigma(a_t),  theta'_t = sigma(b_t) + 0.5
    m_t = lambda_t * sg(u_{t-1}) + I_t
    s_t = theta'_t * H(m_t - theta'_t),  dH/dx := max(1 - |x|, 0)
    u_t = m_t - s_t

Parallel (stateless) neuron: ``s_t = relu(I_t - theta_t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from empf_jax import ops
from empf_jax.quantize import quantize_spike_ste

LIF_THRESHOLD_OFFSET = 0.5
SUPPORTED_SPIKE_BITS = (None, 4)


class EMPFParams(NamedTuple):
  """Per-step scalars of an EM-PF or LIF layer: decay logits ``a``, threshold logits ``b``, [T]."""

  a: jax.Array
  b: jax.Array


class ParallelParams(NamedTuple):
  """Per-step threshold logits ``b`` [T] of a parallel (stateless) neuron."""

  b: jax.Array


class MembraneState(NamedTuple):
  """The membrane potential after reset, u_{t-1}; u_0 = 0."""

  u: jax.Array


class NoState(NamedTuple):
  """State of a stateless neuron."""


def default_unroll() -> bool | int:
  """Unroll time scans fully on CPU, where rolled scans with conv gradients are 30-40x slower.

  On accelerators a rolled scan keeps compile time and code size small.
  """
  return True if jax.default_backend() == "cpu" else 1


def step_scalar(logits: jax.Array, t: jax.Array, like: jax.Array, offset: float = 0.0) -> jax.Array:
  """sigma(logits[t]) + offset in the dtype of ``like``.

  The per-step scalars are float32 parameters; casting them keeps half-precision currents (and so
  the scan carry) in their own dtype instead of promoting them to float32.
  """
  value = (jax.nn.sigmoid(logits[t]) + offset).astype(like.dtype)
  return ops.broadcast_scalar(value, like.shape)


def maybe_quantize(spike: jax.Array, spike_bits: int | None) -> jax.Array:
  """Applies the 4-bit spike code (straight-through) when ``spike_bits == 4``."""
  if spike_bits is None:
    return spike
  return quantize_spike_ste(spike)


def empf_integrate(
  params: EMPFParams, state: MembraneState, current: jax.Array, t: jax.Array, *, online: bool = True
) -> jax.Array:
  """Leaky integration m_t = sigma(a_t) * sg(u_{t-1}) + I_t."""
  u_prev = state.u
  if online:
    # docs/model.md §1, m_t = lambda_t * sg(u_{t-1}) + I_t: the online rule's only temporal cut.
    u_prev = jax.lax.stop_gradient(u_prev)
  return step_scalar(params.a, t, current) * u_prev + current


def empf_fire(
  params: EMPFParams, membrane: jax.Array, t: jax.Array, *, spike_bits: int | None = None
) -> tuple[MembraneState, jax.Array]:
  """Floating-point spike s_t = relu(m_t - theta_t) and reset u_t = m_t - s_t = min(m_t, theta_t).

  The reset uses the unquantised spike; only the emitted spike is quantised.
  """
  spike = jax.nn.relu(membrane - step_scalar(params.b, t, membrane))
  return MembraneState(membrane - spike), maybe_quantize(spike, spike_bits)


def empf_step(
  params: EMPFParams,
  state: MembraneState,
  current: jax.Array,
  t: jax.Array,
  *,
  online: bool = True,
  spike_bits: int | None = None,
  mem_norm: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[MembraneState, jax.Array]:
  """One EM-PF step. ::

    m_t = sigma(a_t) * sg(u_{t-1}) + I_t;  [m_t <- mem_norm(m_t, t)];
    s_t = relu(m_t - sigma(b_t));  u_t = m_t - s_t.

  Args:
    params: per-step logits ``a`` (decay) and ``b`` (threshold), each of shape [T].
    state: membrane after the previous reset.
    current: input current I_t.
    t: 0-based time step (may be traced).
    online: stop the gradient through u_{t-1} (online training); False gives BPTT.
    spike_bits: None for floating-point spikes, 4 for the 4-bit code (straight-through).
    mem_norm: optional membrane transform applied after integration (Mem-BN, or its folded
      per-channel affine form at inference); spike and reset use its output, cast back to the
      membrane's dtype.

  Returns:
    The new state and the spike.
  """
  membrane = empf_integrate(params, state, current, t, online=online)
  if mem_norm is not None:
    membrane = mem_norm(membrane, t).astype(membrane.dtype)
  return empf_fire(params, membrane, t, spike_bits=spike_bits)


def parallel_step(
  params: ParallelParams,
  state: NoState,
  current: jax.Array,
  t: jax.Array,
  *,
  spike_bits: int | None = None,
) -> tuple[NoState, jax.Array]:
  """Stateless neuron s_t = relu(I_t - sigma(b_t)); all steps run at once (:func:`parallel_all`)."""
  return state, maybe_quantize(jax.nn.relu(current - step_scalar(params.b, t, current)), spike_bits)


def parallel_all(
  params: ParallelParams,
  currents: jax.Array,
  t0: jax.Array | int = 0,
  *,
  spike_bits: int | None = None,
) -> jax.Array:
  """All S steps of a parallel neuron at once: s[i] = relu(I[i] - sigma(b[t0 + i]))."""
  steps = currents.shape[0]
  theta = jax.nn.sigmoid(jax.lax.dynamic_slice_in_dim(params.b, t0, steps)).astype(currents.dtype)
  theta = theta.reshape((steps,) + (1,) * (currents.ndim - 1))
  return maybe_quantize(jax.nn.relu(currents - theta), spike_bits)


@jax.custom_vjp
def heaviside_triangle(x: jax.Array) -> jax.Array:
  """Heaviside step with a triangle surrogate gradient.

  Forward:  H(x) = 1[x >= 0].
  Backward: dL/dx = dL/dH * max(1 - |x|, 0).
  """
  return (x >= 0).astype(x.dtype)


def _heaviside_fwd(x):
  return heaviside_triangle(x), x


def _heaviside_bwd(x, g):
  return (g * jnp.maximum(1.0 - jnp.abs(x), 0.0),)


heaviside_triangle.defvjp(_heaviside_fwd, _heaviside_bwd)


def lif_step(
  params: EMPFParams, state: MembraneState, current: jax.Array, t: jax.Array, *, online: bool = True
) -> tuple[MembraneState, jax.Array]:
  """One LIF step with soft reset. ::

    m_t = sigma(a_t) * sg(u_{t-1}) + I_t;  theta'_t = sigma(b_t) + 0.5;
    s_t = theta'_t * H(m_t - theta'_t);  u_t = m_t - s_t.

  ``online=False`` removes the stop-gradient (BPTT). H has the triangle surrogate of
  :func:`heaviside_triangle`.
  """
  membrane = empf_integrate(params, state, current, t, online=online)
  threshold = step_scalar(params.b, t, membrane, LIF_THRESHOLD_OFFSET)
  spike = threshold * heaviside_triangle(membrane - threshold)
  return MembraneState(membrane - spike), spike


StepFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, Any]]


def run_steps(
  step: StepFn,
  state: Any,
  currents: jax.Array,
  t0: jax.Array | int = 0,
  *,
  unroll: bool | int | None = None,
) -> tuple[Any, Any]:
  """Scans ``step(state, current, t) -> (state, out)`` over time-major currents ``[S, B, ...]``.

  The steps are t0, ..., t0 + S - 1. Returns the final state and the stacked outputs.
  """
  steps = currents.shape[0]
  ts = t0 + jnp.arange(steps)

  def body(carry, xs):
    current, t = xs
    return step(carry, current, t)

  return jax.lax.scan(
    body, state, (currents, ts), unroll=default_unroll() if unroll is None else unroll
  )
