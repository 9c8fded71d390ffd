"""Array operations shared by the layers on NHWC / HWIO arrays: convolution, pooling and
BatchNorm statistics."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
CONV_BACKWARDS = ("auto", "custom", "native")


def conv_backward_rule(backward: str = "auto") -> str:
  """The rule a :func:`conv2d` with ``backward`` differentiates by: ``"custom"`` or ``"native"``.

  ``"native"`` differentiates ``lax.conv_general_dilated`` with JAX's own transpose rules,
  ``"custom"`` uses :func:`conv2d_custom_vjp`, and ``"auto"`` (the default) the custom rule where
  ``jax.default_backend()`` is the CPU and the native one elsewhere.

  Raises:
    ValueError: ``backward`` is not one of :data:`CONV_BACKWARDS`.
  """
  if backward not in CONV_BACKWARDS:
    raise ValueError(
      f"conv backward {backward!r} is not allowed; allowed: {', '.join(CONV_BACKWARDS)}"
    )
  if backward == "auto":
    return "custom" if jax.default_backend() == "cpu" else "native"
  return backward


def conv2d(
  x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0, backward: str = "auto"
) -> jax.Array:
  """2-D cross-correlation, NHWC input, HWIO kernel, symmetric zero padding (PyTorch semantics).

  y[n, i, j, o] = sum_{a, b, c} x_pad[n, s*i + a, s*j + b, c] w[a, b, c, o], where x_pad is ``x``
  with ``padding`` zeros on every side, so H' = floor((H + 2p - KH) / s) + 1 (likewise W').
  The gradient follows ``backward`` (:func:`conv_backward_rule`; the custom rule is reverse mode
  only). The choice is an argument, read when the function is traced, so each jitted function
  keeps the rule it was traced with.

  Args:
    x: input [N, H, W, C_in].
    w: kernel [KH, KW, C_in, C_out].
    stride: stride in both spatial dimensions.
    padding: zero padding on every side.
    backward: ``auto``, ``custom`` or ``native`` (:func:`conv_backward_rule`).

  Returns:
    Output [N, H', W', C_out].
  """
  if conv_backward_rule(backward) == "custom":
    return conv2d_custom_vjp(x, w, stride, padding)
  return _conv_forward(x, w, stride, padding)


def _conv_forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    w,
    window_strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    dimension_numbers=_DIMENSION_NUMBERS,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_custom_vjp(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
  """:func:`conv2d` with a backward pass written as stride-1 convolutions and matrix products.

  XLA's CPU backend runs stride-1 NHWC/HWIO convolutions and matrix products on its fast path.
  JAX's own transpose rules turn a strided convolution into an input-dilated convolution (input
  gradient) and a kernel-dilated one (kernel gradient), which it runs more slowly: 3-6x for the
  kernel gradient of a 1x1 stride-2 convolution, ~10% for stride-2 input gradients
  (``python -m benchmarks.investigations.conv_cpu``). For stride 1 this rule computes what the
  native one does.
  Only reverse mode is defined (``jax.jvp`` raises), as for every ``jax.custom_vjp``.

  Forward:  y = conv2d(x, w, s, p) (unchanged).
  Backward, with g = dL/dy [N, H', W', C_out]::

    dL/dx[n, s*m + r, ., c] = sum_j sum_o g[n, m + q_r - j, ., o] w[s*j + b_r, ., c, o]
      (likewise on the width axis), where q_r, b_r = divmod(r + p, s) and g is zero outside
      [0, H'); for each of the s*s phases (r, r') this is a stride-1 convolution of g with the
      taps w[b_r::s, b_r'::s] flipped and transposed to [., ., C_out, C_in]; the phases are then
      interleaved and cropped to H x W. For s = 1 it is the convolution of g with the flipped,
      transposed kernel and padding KH - 1 - p.
    dL/dw[a, b, c, o] = sum_{n, i, j} x_pad[n, s*i + a, s*j + b, c] g[n, i, j, o]: for a 1x1 kernel
      one matrix product of the strided input with g, otherwise a convolution of x with g as the
      kernel, batch and channel axes exchanged and g dilated by s.

  Both are exact up to float rounding (the order of the sums differs from XLA's).

  Args:
    x: input [N, H, W, C_in].
    w: kernel [KH, KW, C_in, C_out].
    stride: stride in both spatial dimensions.
    padding: zero padding on every side.

  Returns:
    Output [N, H', W', C_out].
  """
  return _conv_forward(x, w, stride, padding)


def _conv_custom_fwd(x, w, stride, padding):
  return _conv_forward(x, w, stride, padding), (x, w)


def _conv_custom_bwd(stride, padding, residuals, g):
  x, w = residuals
  return (
    conv2d_input_grad(g, w, x.shape, stride, padding),
    conv2d_kernel_grad(x, g, w.shape, stride, padding),
  )


conv2d_custom_vjp.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def _phase_taps(
  size: int, out_size: int, kernel: int, stride: int, padding: int, phase: int
) -> tuple[slice, tuple[int, int]]:
  """Kernel taps and padding of one stride phase of the input gradient along one axis.

  Input rows s*m + phase (m = 0 .. ceil(size / s) - 1) receive g[m + q - j] w[s*j + b] with
  q, b = divmod(phase + padding, s); as a correlation with the flipped taps that is padding
  (J - 1 - q) before and ceil(size / s) - out_size + q after g, J the number of taps.
  """
  q, b = divmod(phase + padding, stride)
  taps = len(range(b, kernel, stride))
  rows = -(-size // stride)
  return slice(b, kernel, stride), (taps - 1 - q, rows - out_size + q)


def conv2d_input_grad(
  g: jax.Array, w: jax.Array, x_shape: Sequence[int], stride: int, padding: int
) -> jax.Array:
  """dL/dx of :func:`conv2d` from g = dL/dy, as s*s stride-1 convolutions (one per phase).

  Args:
    g: output gradient [N, H', W', C_out].
    w: kernel [KH, KW, C_in, C_out].
    x_shape: the input shape [N, H, W, C_in].
    stride: the forward stride s.
    padding: the forward padding p.

  Returns:
    dL/dx [N, H, W, C_in] (see :func:`conv2d_custom_vjp` for the formula).
  """
  n, h, wd, c_in = x_shape
  kh, kw = w.shape[:2]
  rows, cols = -(-h // stride), -(-wd // stride)
  phases = []
  for r in range(stride):
    taps_h, pad_h = _phase_taps(h, g.shape[1], kh, stride, padding, r)
    row = []
    for r2 in range(stride):
      taps_w, pad_w = _phase_taps(wd, g.shape[2], kw, stride, padding, r2)
      sub = w[taps_h, taps_w]
      if sub.size == 0:
        row.append(jnp.zeros((n, rows, cols, c_in), g.dtype))
        continue
      flipped = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
      row.append(
        jax.lax.conv_general_dilated(
          g,
          flipped,
          window_strides=(1, 1),
          padding=(pad_h, pad_w),
          dimension_numbers=_DIMENSION_NUMBERS,
        )
      )
    phases.append(row)
  if stride == 1:
    return phases[0][0]
  # [N, rows, s, cols, s, C]: phase (r, r') holds input pixels (s*m + r, s*m' + r').
  grid = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
  return grid.reshape(n, rows * stride, cols * stride, c_in)[:, :h, :wd]


def conv2d_kernel_grad(
  x: jax.Array, g: jax.Array, w_shape: Sequence[int], stride: int, padding: int
) -> jax.Array:
  """dL/dw of :func:`conv2d` from the input x and g = dL/dy.

  Args:
    x: input [N, H, W, C_in].
    g: output gradient [N, H', W', C_out].
    w_shape: the kernel shape [KH, KW, C_in, C_out].
    stride: the forward stride s.
    padding: the forward padding p.

  Returns:
    dL/dw [KH, KW, C_in, C_out] (see :func:`conv2d_custom_vjp` for the formula).
  """
  kh, kw = w_shape[:2]
  _, h, wd, _ = x.shape
  _, out_h, out_w, _ = g.shape
  if kh == kw == 1:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taken = x[:, : (out_h - 1) * stride + 1 : stride, : (out_w - 1) * stride + 1 : stride]
    dw = jax.lax.dot_general(
      taken,
      g,
      (((0, 1, 2), (0, 1, 2)), ((), ())),
      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
    )
    return dw.reshape(w_shape).astype(x.dtype)
  # Batch N becomes the contracted feature axis and C_in the batch: a stride-1 convolution of
  # [C_in, H, W, N] with the [H', W', N, C_out] kernel g, dilated by s, gives [C_in, KH, KW, C_out].
  # The padding after the input is cut (negative) to what the last tap reads, so the output is
  # exactly KH x KW; it stays inside the convolution, which XLA's CPU runs ~3x faster than a
  # convolution of an explicitly padded input.
  dw = jax.lax.conv_general_dilated(
    batch_last(x),
    g.transpose(1, 2, 0, 3),
    window_strides=(1, 1),
    padding=(
      (padding, (out_h - 1) * stride + kh - h - padding),
      (padding, (out_w - 1) * stride + kw - wd - padding),
    ),
    rhs_dilation=(stride, stride),
    dimension_numbers=_DIMENSION_NUMBERS,
  )
  return dw.transpose(1, 2, 0, 3)


def batch_last(x: jax.Array) -> jax.Array:
  """x [N, H, W, C] as [C, H, W, N] (the input of the kernel-gradient convolution).

  In a training step x is the spike map of the previous layer, and XLA fuses its elementwise
  producer (BatchNorm and neuron) into the transpose: a loop over the transposed order whose reads
  stride over N, which XLA's CPU backend ran ~4x slower than the same transpose of a stored array
  (~25 against ~6 ms for [64, 32, 32, 64]). A matrix product is not fused with its producer, so x
  first goes through one with the identity in its own layout, x[NHW, C] I[C, C] -> [NHW, C] (a
  product XLA runs as stored, without transposing an operand), and the transpose reads that
  stored product. Each output is x * 1 plus zeros, so the result equals the plain transpose for
  every finite x (an inf or NaN would spread to the other channels of its pixel). The product
  costs C multiply-adds per element, a small share of the convolution whose kernel gradient
  reads it (a ninth for 3x3, stride 1, C -> C; a fifth for 3x3, stride 2, C -> 2C). With the
  identity on the other side, I[C, C] x[NHW, C]^T, XLA made a transposed copy of x for the
  product, fused with the producer again (BENCHMARKS.md, "Investigations", has the profile).
  """
  n, h, w, c = x.shape
  product = jax.lax.dot_general(
    x.reshape(n * h * w, c), jnp.eye(c, dtype=x.dtype), (((1,), (0,)), ((), ()))
  )  # [NHW, C], x's own layout
  return product.reshape(n, h, w, c).transpose(3, 1, 2, 0)


def batch_shards(batch: int) -> int:
  """How many devices split a batch axis of size ``batch``: the size of the mesh set with
  :func:`jax.set_mesh` (data parallelism splits the batch over all of its devices), 1 without
  one or when it does not divide ``batch``."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else mesh.size
  return shards if batch % shards == 0 else 1


def fold_time(x: jax.Array, fn) -> jax.Array:
  """Applies ``fn`` (which takes [N, ...]) to time-major ``x`` [S, B, ...] on the folded S*B batch.

  The fold keeps a sharded batch axis sharded. Merging [S, B] with B split over D devices into
  one axis cannot be described as a split of the merged axis (each device would hold S separate
  pieces of it), so XLA's partitioner gathers the whole batch onto every device and each device
  computes all of it. Instead B is viewed as [D, B/D] and D is moved in front of S: [D*S*B/D] is
  split over D devices in contiguous blocks, each device's block being its own examples, and the
  unfold reverses that. D comes from :func:`batch_shards`; with D = 1 the moves are of a unit axis
  and compile to nothing, so one device runs the plain S*B fold.
  """
  steps, batch = x.shape[:2]
  shards = batch_shards(batch)
  local = (steps, shards, batch // shards)
  y = fn(x.reshape(local + x.shape[2:]).swapaxes(0, 1).reshape((steps * batch,) + x.shape[2:]))
  y = y.reshape((shards, steps, batch // shards) + y.shape[1:]).swapaxes(0, 1)
  return y.reshape((steps, batch) + y.shape[3:])


def avg_pool(x: jax.Array, window: int) -> jax.Array:
  """Non-overlapping average pooling over the two spatial axes of [..., H, W, C]."""
  *lead, h, w, c = x.shape
  h, w = h - h % window, w - w % window  # floor, as PyTorch's AvgPool2d
  x = x[..., :h, :w, :].reshape(*lead, h // window, window, w // window, window, c)
  return jnp.mean(x, axis=(-4, -2))


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """Max pooling over the two spatial axes of [N, H, W, C] with -inf padding (PyTorch semantics)."""
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, window, window, 1),
    (1, stride, stride, 1),
    ((0, 0), (padding, padding), (padding, padding), (0, 0)),
  )


def spatial_mean(x: jax.Array, axes: Sequence[int] = (-3, -2)) -> jax.Array:
  """Global average pooling over the spatial axes of [..., H, W, C]."""
  return jnp.mean(x, axis=tuple(axes))


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics. XLA's CPU backend runs a reduction over many elements as a tree of
# reduce-window operations, about 0.5 G elements/s on one thread; a matrix-vector product with a
# vector of ones sums the same numbers 2-4x faster on every core. A ResNet-18 training step
# (batch 64) reduces ~390 M elements per time step in its BatchNorms and their gradients.


def _sums_by_matmul() -> bool:
  return jax.default_backend() == "cpu"


def channel_sums(x: jax.Array) -> jax.Array:
  """Sums of ``x`` [S, ..., C] over its middle axes: [S, C] (on the CPU one matrix-vector product
  with a vector of ones per slice s, elsewhere ``jnp.sum``)."""
  if not _sums_by_matmul():
    return jnp.sum(x, axis=tuple(range(1, x.ndim - 1)))
  steps, channels = x.shape[0], x.shape[-1]
  rows = x.reshape(steps, -1, channels)
  ones = jnp.ones((1, rows.shape[1]), x.dtype)
  return jnp.concatenate([ones @ rows[s] for s in range(steps)], axis=0)


def _standardize_reference(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)
  xhat = (x - jnp.expand_dims(mean, axes)) * jax.lax.rsqrt(jnp.expand_dims(var, axes) + epsilon)
  return xhat, mean, var


def standardize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm without its affine part, per slice s and channel c of x [S, ..., C].

  mean[s, c] and the biased var[s, c] are over the middle axes (n elements), and
  xhat = (x - mean) / sqrt(var + epsilon). On the CPU the sums are matrix-vector products
  (:func:`channel_sums`) and the gradient is the closed form below (its sums too); elsewhere it
  is XLA's reductions and JAX's differentiation of them. With r = 1 / sqrt(var + epsilon) and
  cotangents g, g_mean, g_var of xhat, mean, var::

    dL/dx = r (g - sum(g) / n - xhat sum(g xhat) / n) + g_mean / n + 2 g_var xhat / (r n).

  Returns:
    xhat (the shape of x), mean [S, C] and var [S, C].
  """
  if not _sums_by_matmul():
    return _standardize_reference(x, epsilon)
  return _standardize_matmul(x, epsilon)


def _broadcast_rows(v: jax.Array, x: jax.Array) -> jax.Array:
  """[S, C] statistics as [S, 1, ..., 1, C] against x [S, ..., C]."""
  return v.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _standardize_matmul(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  return _standardize_matmul_fwd(x, epsilon)[0]


def _standardize_matmul_fwd(x, epsilon):
  n = math.prod(x.shape[1:-1])
  mean = channel_sums(x) / n
  centered = x - _broadcast_rows(mean, x)
  var = channel_sums(centered * centered) / n
  r = jax.lax.rsqrt(var + epsilon)
  xhat = centered * _broadcast_rows(r, x)
  return (xhat, mean, var), (xhat, r)


def _standardize_matmul_bwd(epsilon, residuals, cotangents):
  del epsilon
  xhat, r = residuals
  g, g_mean, g_var = cotangents
  return (
    _standardize_input_grad(xhat, r, r, g, channel_sums(g), channel_sums(g * xhat), g_mean, g_var),
  )


def _standardize_input_grad(xhat, r, gain, g, sum_g, sum_gx, g_mean, g_var):
  """dL/dx of :func:`standardize` (its formula, with ``gain`` = r; r * scale for
  :func:`batch_norm`, whose g is the cotangent of y), from the sums of g and g xhat [S, C]."""
  n = math.prod(xhat.shape[1:-1])
  dx = _broadcast_rows(gain, xhat) * (
    g - _broadcast_rows(sum_g / n, xhat) - xhat * _broadcast_rows(sum_gx / n, xhat)
  )
  return dx + _broadcast_rows(g_mean / n, xhat) + xhat * _broadcast_rows(2 * g_var / (r * n), xhat)


_standardize_matmul.defvjp(_standardize_matmul_fwd, _standardize_matmul_bwd)


def batch_norm(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm y = xhat * scale + bias per slice s of x [S, ..., C] (scale and bias
  [C], shared by the slices), with xhat, mean and var as in :func:`standardize`.

  On the CPU the gradient is one closed form for x, scale and bias whose sums are the two
  matrix-vector products sum(g_y) and sum(g_y xhat) per slice and channel (:func:`channel_sums`):
  dL/dbias and dL/dscale are those sums over the slices, and dx is :func:`standardize`'s formula
  with g = scale * g_y. Elsewhere it is the reference and JAX's differentiation of it.

  Returns:
    y (the shape of x), mean [S, C] and var [S, C].
  """
  if not _sums_by_matmul():
    xhat, mean, var = _standardize_reference(x, epsilon)
    return xhat * scale + bias, mean, var
  return _batch_norm_matmul(x, scale, bias, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_matmul(x, scale, bias, epsilon):
  return _batch_norm_matmul_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_matmul_fwd(x, scale, bias, epsilon):
  (xhat, mean, var), (_, r) = _standardize_matmul_fwd(x, epsilon)
  return (xhat * scale + bias, mean, var), (xhat, r, scale)


def _batch_norm_matmul_bwd(epsilon, residuals, cotangents):
  del epsilon
  xhat, r, scale = residuals
  g, g_mean, g_var = cotangents
  sum_g = channel_sums(g)  # [S, C]
  sum_gx = channel_sums(g * xhat)
  dx = _standardize_input_grad(xhat, r, r * scale, g, sum_g, sum_gx, g_mean, g_var)
  return dx, jnp.sum(sum_gx, axis=0).astype(scale.dtype), jnp.sum(sum_g, axis=0).astype(scale.dtype)


_batch_norm_matmul.defvjp(_batch_norm_matmul_fwd, _batch_norm_matmul_bwd)


def total_sum(x: jax.Array) -> jax.Array:
  """The sum of every element of ``x``, accumulated in float32 (on the CPU one matrix-vector
  product over the rows of its last axis and a sum of that row, elsewhere ``jnp.sum``)."""
  if not _sums_by_matmul() or x.ndim == 0:
    return jnp.sum(x, dtype=jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  ones = jnp.ones((1, rows.shape[0]), x.dtype)
  return jnp.sum(jnp.dot(ones, rows, preferred_element_type=jnp.float32))


def broadcast_scalar(value: jax.Array, shape: Sequence[int]) -> jax.Array:
  """``jnp.broadcast_to(value, shape)`` for a 0-d ``value`` whose gradient, the sum of the
  cotangent over ``shape``, is :func:`total_sum` (a matrix-vector product on the CPU instead of
  XLA's reduction, 1.5-3x faster there)."""
  if not _sums_by_matmul():
    return jnp.broadcast_to(value, shape)
  return _broadcast_scalar(value, tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_scalar(value, shape):
  return jnp.broadcast_to(value, shape)


def _broadcast_scalar_fwd(value, shape):
  return jnp.broadcast_to(value, shape), None


def _broadcast_scalar_bwd(shape, residuals, g):
  del shape, residuals
  return (total_sum(g).astype(g.dtype),)  # g has the dtype of the broadcast, value's


_broadcast_scalar.defvjp(_broadcast_scalar_fwd, _broadcast_scalar_bwd)
