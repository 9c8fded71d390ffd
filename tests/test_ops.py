"""Tests of the convolution in empf_jax.ops: PyTorch forward semantics and the custom backward."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from empf_jax import layers, ops

# Every (kernel, stride, padding) the networks use, plus the other combinations of those values.
KERNELS = (1, 3, 7)
STRIDES = (1, 2)
PADDINGS = (0, 1, 3)
# (H, W): odd and non-square, and even.
SIZES = ((9, 7), (8, 6))
CASES = [
  pytest.param(k, s, p, hw, id=f"k{k}-s{s}-p{p}-{hw[0]}x{hw[1]}")
  for k, s, p, hw in itertools.product(KERNELS, STRIDES, PADDINGS, SIZES)
  if min(hw) + 2 * p >= k
]


def _reference_conv(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
  """y[n, i, j, o] = sum_{a, b, c} x_pad[n, s*i + a, s*j + b, c] w[a, b, c, o], in float64."""
  x = np.pad(x.astype(np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  kh, kw = w.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      window = x[:, stride * i : stride * i + kh, stride * j : stride * j + kw, :]
      y[:, i, j, :] = np.einsum("nabc,abco->no", window, w.astype(np.float64))
  return y


def _normal(seed, shape, dtype=jnp.float32):
  # NumPy draws: jax.random would compile a sampler for every shape of the sweep.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _inputs(kernel, hw, seed=0, dtype=jnp.float32):
  return (_normal(seed, (2, *hw, 3), dtype), _normal(seed + 1000, (kernel, kernel, 3, 4), dtype))


def _conv_and_grads(mode, x, w, g, stride, padding):
  """(y, dL/dx, dL/dw) for cotangent g, traced afresh under backward ``mode`` and jitted whole."""

  def conv_and_grads(x, w, g):
    y, vjp = jax.vjp(lambda x, w: ops.conv2d(x, w, stride, padding, mode), x, w)
    return (y, *vjp(g))

  return jax.jit(conv_and_grads)(x, w, g)


def _assert_close_scaled(actual, expected, rtol):
  """|actual - expected| <= rtol * max |expected|, elementwise (sums of signed terms cancel)."""
  chex.assert_equal_shape([actual, expected])
  actual = np.asarray(actual).astype(np.float64)
  expected = np.asarray(expected).astype(np.float64)
  np.testing.assert_allclose(actual, expected, rtol=0.0, atol=rtol * np.max(np.abs(expected)))


@pytest.mark.parametrize("kernel,stride,padding,hw", CASES)
def test_forward_and_custom_backward(kernel, stride, padding, hw):
  """Both rules give PyTorch's cross-correlation; the custom dL/dx and dL/dw equal JAX's."""
  x, w = _inputs(kernel, hw, seed=1)
  out_shape = (
    2,
    (hw[0] + 2 * padding - kernel) // stride + 1,
    (hw[1] + 2 * padding - kernel) // stride + 1,
    4,
  )
  g = _normal(2, out_shape)
  y, dx, dw = _conv_and_grads("custom", x, w, g, stride, padding)
  y_native, dx_native, dw_native = _conv_and_grads("native", x, w, g, stride, padding)
  chex.assert_shape([y, y_native], out_shape)
  chex.assert_shape(dx, x.shape)
  chex.assert_shape(dw, w.shape)
  chex.assert_trees_all_equal(y, y_native)
  np.testing.assert_allclose(
    np.asarray(y),
    _reference_conv(np.asarray(x), np.asarray(w), stride, padding),
    rtol=1e-5,
    atol=1e-5,
  )
  _assert_close_scaled(dx, dx_native, rtol=1e-5)
  _assert_close_scaled(dw, dw_native, rtol=1e-5)


def test_custom_backward_is_the_adjoint_of_the_forward():
  """<conv(x, w), g> = <x, dL/dx> = <w, dL/dw> for the linear maps x -> y and w -> y."""
  x, w = _inputs(3, (9, 7), seed=3)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  g = _normal(4, (2, 5, 4, 4))
  _, dx, dw = _conv_and_grads("custom", x, w, g, 2, 1)
  inner = np.sum(_reference_conv(x64, w64, 2, 1) * np.asarray(g, np.float64))
  np.testing.assert_allclose(np.sum(x64 * np.asarray(dx, np.float64)), inner, rtol=1e-5)
  np.testing.assert_allclose(np.sum(w64 * np.asarray(dw, np.float64)), inner, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_custom_backward_bfloat16(kernel, stride, padding):
  x, w = _inputs(kernel, (9, 9), seed=5, dtype=jnp.bfloat16)
  out_size = (9 + 2 * padding - kernel) // stride + 1
  g = _normal(6, (2, out_size, out_size, 4), jnp.bfloat16)
  y, dx, dw = _conv_and_grads("custom", x, w, g, stride, padding)
  chex.assert_type([y, dx, dw], jnp.bfloat16)
  _, dx_ref, dw_ref = _conv_and_grads(
    "native", x.astype(jnp.float32), w.astype(jnp.float32), g.astype(jnp.float32), stride, padding
  )
  _assert_close_scaled(dx, dx_ref, rtol=2e-2)
  _assert_close_scaled(dw, dw_ref, rtol=2e-2)


def test_custom_backward_under_jit_traces_once():
  x, w = _inputs(3, (8, 8), seed=7)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_and_grads(x, w):
    return jax.value_and_grad(lambda x, w: jnp.sum(ops.conv2d(x, w, 2, 1, "custom") ** 2), (0, 1))(
      x, w
    )

  loss, (dx, dw) = loss_and_grads(x, w)
  loss_and_grads(x + 1.0, w)
  loss_ref, (dx_ref, dw_ref) = jax.value_and_grad(
    lambda x, w: jnp.sum(ops.conv2d(x, w, 2, 1, "native") ** 2), (0, 1)
  )(x, w)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  _assert_close_scaled(dx, dx_ref, rtol=1e-5)
  _assert_close_scaled(dw, dw_ref, rtol=1e-5)


def _uses_custom_vjp(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return any("custom_vjp" in eqn.primitive.name for eqn in jaxpr.jaxpr.eqns)


def test_the_backward_argument_selects_the_rule():
  x, w = _inputs(3, (8, 8))
  assert _uses_custom_vjp(lambda x, w: ops.conv2d(x, w, 1, 1, "custom"), x, w)
  assert not _uses_custom_vjp(lambda x, w: ops.conv2d(x, w, 1, 1, "native"), x, w)
  on_cpu = jax.default_backend() == "cpu"
  assert _uses_custom_vjp(lambda x, w: ops.conv2d(x, w, 1, 1), x, w) == on_cpu
  assert ops.conv_backward_rule() == ("custom" if on_cpu else "native")


def test_a_layer_keeps_its_rule_and_a_change_retraces():
  layer = layers.QConv(3, 4, 3, weights="float", rngs=nnx.Rngs(0))
  x = _normal(0, (1, 2, 8, 8, 3))
  traced = []

  @nnx.jit
  def kernel_grad(layer, x):
    traced.append(layer.conv_backward)
    assert _uses_custom_vjp(lambda x: layer(x), x) == (layer.conv_backward == "custom")
    return nnx.grad(lambda layer: jnp.sum(layer(x) ** 2))(layer).kernel[...]

  grads = {}
  for rule in ("native", "custom", "native"):
    layer.conv_backward = rule
    grads[rule] = kernel_grad(layer, x)
  assert traced == ["native", "custom"]  # the second "native" call reuses its trace
  _assert_close_scaled(grads["custom"], grads["native"], rtol=1e-5)


def test_unknown_backward_rules_are_rejected_with_the_allowed_ones():
  with pytest.raises(ValueError, match="'xla'.*auto, custom, native"):
    ops.conv_backward_rule("xla")
  with pytest.raises(ValueError, match="'xla'.*auto, custom, native"):
    layers.QConv(3, 4, 3, conv_backward="xla", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(1, 6, 5, 5, 3), (3, 4, 7), (2, 8, 3, 3, 4)])
def test_standardize_and_its_gradient_equal_the_reductions(shape):
  """The CPU BatchNorm statistics (matrix-vector sums, closed-form gradient) against XLA's
  reductions and JAX's differentiation of them, every output's cotangent non-zero."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
  s, c = shape[0], shape[-1]
  cotangents = (
    jax.random.normal(keys[1], shape),
    jax.random.normal(keys[2], (s, c)),
    jax.random.normal(keys[3], (s, c)),
  )
  fast, fast_vjp = jax.vjp(lambda v: ops.standardize(v, 1e-5), x)
  slow, slow_vjp = jax.vjp(lambda v: ops._standardize_reference(v, 1e-5), x)
  for a, b in zip(fast, slow):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast_vjp(cotangents)[0], slow_vjp(cotangents)[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    ops.channel_sums(x), jnp.sum(x, axis=tuple(range(1, x.ndim - 1))), rtol=1e-5
  )


@pytest.mark.parametrize("shape", [(1, 6, 5, 5, 3), (3, 4, 7), (2, 8, 3, 3, 4)])
def test_batch_norm_and_its_gradients_equal_the_reductions(shape):
  """The CPU BatchNorm with its affine part (one closed-form VJP for x, scale and bias) against
  the reference statistics and JAX's differentiation of them, every cotangent non-zero."""
  keys = jax.random.split(jax.random.key(1), 6)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
  s, c = shape[0], shape[-1]
  scale = 1.0 + 0.5 * jax.random.normal(keys[1], (c,))
  bias = jax.random.normal(keys[2], (c,))
  cotangents = (
    jax.random.normal(keys[3], shape),
    jax.random.normal(keys[4], (s, c)),
    jax.random.normal(keys[5], (s, c)),
  )

  def reference(x, scale, bias):
    xhat, mean, var = ops._standardize_reference(x, 1e-5)
    return xhat * scale + bias, mean, var

  fast, fast_vjp = jax.vjp(lambda *a: ops.batch_norm(*a, 1e-5), x, scale, bias)
  slow, slow_vjp = jax.vjp(reference, x, scale, bias)
  for a, b in zip(fast, slow):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(fast_vjp(cotangents), slow_vjp(cotangents)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_broadcast_scalar_gradient_is_the_sum_of_its_cotangent(dtype):
  value = jnp.asarray(0.3, dtype)
  g = jax.random.normal(jax.random.key(2), (4, 5, 6, 8)).astype(dtype)
  out, vjp = jax.vjp(lambda v: ops.broadcast_scalar(v, g.shape), value)
  assert out.shape == g.shape and out.dtype == dtype
  assert bool(jnp.all(out == value))
  (grad,) = vjp(g)
  assert grad.shape == () and grad.dtype == dtype
  np.testing.assert_allclose(
    np.float32(grad), np.sum(np.asarray(g, np.float64)), rtol=1e-5 if dtype == jnp.float32 else 1e-2
  )
  np.testing.assert_allclose(
    ops.total_sum(g), np.sum(np.asarray(g, np.float64)), rtol=1e-5 if dtype == jnp.float32 else 1e-2
  )


@pytest.mark.parametrize(
  "channels,dtype", [(3, jnp.float32), (64, jnp.float32), (512, jnp.float32), (64, jnp.bfloat16)]
)
def test_batch_last_equals_the_transpose_exactly(channels, dtype):
  """Through the identity product, also with an elementwise producer XLA can fuse, the result is
  the transpose bit for bit."""
  x = jax.random.normal(jax.random.key(3), (5, 4, 3, channels)).astype(dtype)
  shift = jnp.linspace(-1.0, 1.0, channels).astype(dtype)
  fused = jax.jit(lambda x: ops.batch_last(jax.nn.relu(2.0 * x - shift)))  # exact in any order
  expected = np.transpose(np.asarray(jax.nn.relu(2.0 * x - shift)), (3, 1, 2, 0))
  np.testing.assert_array_equal(fused(x), expected)
  np.testing.assert_array_equal(ops.batch_last(x), np.transpose(np.asarray(x), (3, 1, 2, 0)))
