"""Weight and spike quantisers with straight-through gradients (docs/model.md §1-2).

Each quantiser is a module-level ``jax.custom_vjp`` whose docstring states the forward rule and the
exact backward rule; ``tests/test_quantize.py`` pins both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from empf_jax import ops

TERNARY_DELTA_FACTOR = 0.7
SPIKE_LEVELS = 4.0
SPIKE_MAX_CODE = 15.0


def _channel_axes(w: jax.Array) -> tuple[int, ...]:
  """Every axis but the last (output channels): HWIO kernels reduce over H, W, I."""
  return tuple(range(w.ndim - 1))


def binary_scale(w: jax.Array) -> jax.Array:
  """Per-output-channel scale alpha_o = mean abs(W) over the kernel of output channel o.

  The sums are :func:`empf_jax.ops.channel_sums` (a matrix-vector product on the CPU, where XLA's
  reduction of a 3x3x512x512 kernel took ~6 ms of a ResNet-18 step, and ``jnp.sum`` elsewhere).
  """
  if w.ndim < 2:
    return jnp.mean(jnp.abs(w), axis=_channel_axes(w), keepdims=True)
  rows = jnp.abs(w).reshape(1, -1, w.shape[-1])  # one slice: [1, KH*KW*C_in, C_out]
  return (ops.channel_sums(rows) / rows.shape[1]).reshape((1,) * (w.ndim - 1) + w.shape[-1:])


def binary_sign(w: jax.Array) -> jax.Array:
  """sign(W) with sign(0) = +1, so that every weight is one bit."""
  return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


@jax.custom_vjp
def binarize_ste(w: jax.Array) -> jax.Array:
  """Binarises a weight tensor with a clipped straight-through gradient.

  Forward:  W_b = alpha_o * sign(W), alpha_o = mean_{h,w,i} |W[h, w, i, o]|, sign(0) = +1.
  Backward: dL/dW = dL/dW_b * 1[|W| <= 1]  (not scaled by alpha; alpha gets no gradient).

  Args:
    w: latent full-precision weights, output channels on the last axis.

  Returns:
    The binarised weights, same shape and dtype as ``w``.
  """
  return binary_scale(w) * binary_sign(w)


def _binarize_fwd(w):
  return binarize_ste(w), w


def _binarize_bwd(w, g):
  return (g * (jnp.abs(w) <= 1.0).astype(g.dtype),)


binarize_ste.defvjp(_binarize_fwd, _binarize_bwd)


def ternary_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ternary codes in {-1, 0, +1} and the tensor-wide scale alpha of the TWN rule.

  W_c = clip(W, -1, 1); Delta = 0.7 mean abs(W_c); alpha = mean of abs(W_c) where abs(W_c) > Delta
  (0 when no weight exceeds Delta); codes = 1[W_c > Delta] - 1[W_c < -Delta].
  """
  wc = jnp.clip(w, -1.0, 1.0)
  delta = TERNARY_DELTA_FACTOR * jnp.mean(jnp.abs(wc))
  pos = wc > delta
  neg = wc < -delta
  mask = pos | neg
  count = jnp.sum(mask)
  alpha = jnp.where(count > 0, jnp.sum(jnp.abs(wc) * mask) / jnp.maximum(count, 1), 0.0)
  codes = pos.astype(w.dtype) - neg.astype(w.dtype)
  return codes, alpha.astype(w.dtype)


@jax.custom_vjp
def ternarize_ste(w: jax.Array) -> jax.Array:
  """Ternarises a weight tensor (TWN rule) with a clipped straight-through gradient.

  Forward:  W_t = alpha * (1[W_c > Delta] - 1[W_c < -Delta]), W_c = clip(W, -1, 1),
            Delta = 0.7 mean |W_c|, alpha = mean_{|W_c| > Delta} |W_c| (0 if that set is empty).
  Backward: dL/dW = dL/dW_t * 1[-1 < W < 1].

  Args:
    w: latent full-precision weights.

  Returns:
    The ternarised weights, same shape and dtype as ``w``.
  """
  codes, alpha = ternary_codes(w)
  return alpha * codes


def _ternarize_fwd(w):
  return ternarize_ste(w), w


def _ternarize_bwd(w, g):
  return (g * ((w > -1.0) & (w < 1.0)).astype(g.dtype),)


ternarize_ste.defvjp(_ternarize_fwd, _ternarize_bwd)


def quantize_spike(s: jax.Array) -> jax.Array:
  """4-bit spike code without gradient: Q(s) = clip(round(4 s), 0, 15) / 4."""
  return jnp.clip(jnp.round(SPIKE_LEVELS * s), 0.0, SPIKE_MAX_CODE) / SPIKE_LEVELS


@jax.custom_vjp
def quantize_spike_ste(s: jax.Array) -> jax.Array:
  """Compresses floating-point spikes to 4 bits with an identity straight-through gradient.

  Forward:  Q(s) = clip(round(4 s), 0, 15) / 4  (round half to even).
  Backward: dL/ds = dL/dQ.
  """
  return quantize_spike(s)


def _quantize_spike_fwd(s):
  return quantize_spike(s), None


def _quantize_spike_bwd(_, g):
  return (g,)


quantize_spike_ste.defvjp(_quantize_spike_fwd, _quantize_spike_bwd)


WEIGHT_QUANTIZERS = {
  "binary": binarize_ste,
  "ternary": ternarize_ste,
}
