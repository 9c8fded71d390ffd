"""Weight and spike quantisers: forward values by hand and straight-through backward by definition.

docs/model.md §2 (binary, ternary weights) and §1 (4-bit spikes). Expected numbers are worked
out by hand in the comments, never by calling the function under test.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from empf_jax import quantize


def _kernel(channels):
  """Stacks per-output-channel value lists into an HWIO kernel of shape [2, 1, 2, O]."""
  return jnp.asarray(np.stack([np.reshape(c, (2, 1, 2)) for c in channels], axis=-1), jnp.float32)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _vjp(fn, w, g):
  _, pullback = jax.vjp(fn, w)
  return pullback(g)[0]


# Output channel 0: mean|W| = (0.5 + 1.5 + 0 + 0.2) / 4 = 0.55; sign(0) = +1.
# Output channel 1: mean|W| = (0.25 + 1 + 1 + 2.25) / 4 = 1.125.
BINARY_W = [[0.5, -1.5, 0.0, 0.2], [-0.25, 1.0, -1.0, 2.25]]
BINARY_FORWARD = [[0.55, -0.55, 0.55, 0.55], [-1.125, 1.125, -1.125, 1.125]]
BINARY_PASS = [[1, 0, 1, 1], [1, 1, 1, 0]]  # 1[|W| <= 1]: |W| = 1 passes, 1.5 and 2.25 do not.


def test_binarize_forward_by_hand():
  w = _kernel(BINARY_W)
  chex.assert_trees_all_close(quantize.binarize_ste(w), _kernel(BINARY_FORWARD), atol=1e-7)
  chex.assert_trees_all_equal(quantize.binary_sign(w), _kernel([[1, -1, 1, 1], [-1, 1, -1, 1]]))


def test_binarize_backward_is_clipped_identity():
  w = _kernel(BINARY_W)
  g = _normal(0, w.shape)
  chex.assert_trees_all_equal(_vjp(quantize.binarize_ste, w, g), g * _kernel(BINARY_PASS))
  chex.assert_trees_all_equal(
    jax.jit(jax.grad(lambda v: jnp.sum(quantize.binarize_ste(v) * g)))(w), g * _kernel(BINARY_PASS)
  )


def test_binary_scale_is_per_output_channel_over_hwi():
  scales = jnp.array([0.1, 1.0, 3.0, 10.0])
  w = _normal(1, (3, 3, 5, 4)) * scales
  expected = np.array([np.mean(np.abs(np.asarray(w)[:, :, :, o])) for o in range(4)])
  alpha = quantize.binary_scale(w)
  chex.assert_shape(alpha, (1, 1, 1, 4))
  chex.assert_trees_all_close(alpha.reshape(4), jnp.asarray(expected), rtol=1e-6)
  chex.assert_trees_all_close(
    jnp.abs(quantize.binarize_ste(w)), jnp.broadcast_to(alpha, w.shape), rtol=1e-6
  )


# W = [0.9, -0.05, 0.3, -1.6, 1.0, 0.0, -0.4, 0.1]; W_c clips -1.6 to -1.
# mean|W_c| = 3.75 / 8 = 0.46875, Delta = 0.328125: |W_c| > Delta for 0.9, -1, 1, -0.4;
# alpha = (0.9 + 1 + 1 + 0.4) / 4 = 0.825 (0.3 < Delta gives 0).
TERNARY_W = [0.9, -0.05, 0.3, -1.6, 1.0, 0.0, -0.4, 0.1]
TERNARY_CODES = [1, 0, 0, -1, 1, 0, -1, 0]
TERNARY_PASS = [1, 1, 1, 0, 0, 1, 1, 1]  # 1[-1 < W < 1]: W = 1 and W = -1.6 block.


def test_ternarize_forward_by_hand():
  w = jnp.asarray(TERNARY_W, jnp.float32).reshape(2, 2, 1, 2)
  codes, alpha = quantize.ternary_codes(w)
  chex.assert_trees_all_equal(codes.ravel(), jnp.asarray(TERNARY_CODES, jnp.float32))
  chex.assert_trees_all_close(alpha, jnp.float32(0.825), atol=1e-7)
  chex.assert_trees_all_close(
    quantize.ternarize_ste(w).ravel(), 0.825 * jnp.asarray(TERNARY_CODES, jnp.float32), atol=1e-7
  )


def test_ternary_scale_is_tensor_wide():
  w = jnp.array([0.1, -0.2, 0.8, -0.5]).reshape(1, 1, 2, 2)
  # Output channels [0.1, 0.8] and [-0.2, -0.5]. Tensor-wide: mean|W| = 0.4, Delta = 0.28, kept
  # 0.8 and -0.5, alpha = 0.65. A per-channel rule would give 0.8 and -0.5 instead.
  chex.assert_trees_all_close(
    quantize.ternarize_ste(w), jnp.array([0.0, 0.0, 0.65, -0.65]).reshape(1, 1, 2, 2), atol=1e-7
  )


def test_ternarize_backward_passes_strictly_inside_unit_interval():
  w = jnp.asarray(TERNARY_W, jnp.float32).reshape(2, 2, 1, 2)
  g = _normal(2, w.shape)
  chex.assert_trees_all_equal(
    _vjp(quantize.ternarize_ste, w, g), g * jnp.asarray(TERNARY_PASS, jnp.float32).reshape(w.shape)
  )


def test_ternary_without_weights_above_delta_has_zero_scale_and_no_nan():
  w = jnp.zeros((3, 3, 2, 4))
  codes, alpha = quantize.ternary_codes(w)
  assert float(alpha) == 0.0
  chex.assert_trees_all_equal(codes, jnp.zeros_like(w))
  chex.assert_trees_all_equal(quantize.ternarize_ste(w), jnp.zeros_like(w))
  chex.assert_trees_all_equal(
    jax.jit(jax.grad(lambda v: jnp.sum(quantize.ternarize_ste(v))))(w), jnp.ones_like(w)
  )
  chex.assert_tree_all_finite(jax.jit(jax.grad(lambda v: quantize.ternary_codes(v)[1]))(w))


# s:    -0.3  0   0.1  0.125  0.375  0.6  0.625  1.1  3.75  3.9   10
# 4s:   -1.2  0   0.4  0.5    1.5    2.4  2.5    4.4  15    15.6  40
# round:  -1  0   0    0      2      2    2      4    15    16    40   (half to even)
# clip/4:  0  0   0    0      0.5    0.5  0.5    1    3.75  3.75  3.75
SPIKES = [-0.3, 0.0, 0.1, 0.125, 0.375, 0.6, 0.625, 1.1, 3.75, 3.9, 10.0]
SPIKE_CODES = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 3.75, 3.75, 3.75]


@pytest.mark.parametrize("fn", [quantize.quantize_spike, quantize.quantize_spike_ste])
def test_spike_code_by_hand(fn):
  chex.assert_trees_all_equal(fn(jnp.asarray(SPIKES)), jnp.asarray(SPIKE_CODES))
  chex.assert_trees_all_equal(jax.jit(fn)(jnp.asarray(SPIKES)), jnp.asarray(SPIKE_CODES))


def test_spike_code_backward_is_identity_even_where_clipped():
  s = jnp.asarray(SPIKES)
  g = _normal(3, s.shape)
  chex.assert_trees_all_equal(_vjp(quantize.quantize_spike_ste, s, g), g)
