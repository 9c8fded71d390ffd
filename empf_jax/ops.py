"""Array operations shared by the layers: convolution and pooling on NHWC / HWIO arrays."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
  """2-D cross-correlation, NHWC input, HWIO kernel, symmetric zero padding (PyTorch semantics).

  Args:
    x: input [N, H, W, C_in].
    w: kernel [KH, KW, C_in, C_out].
    stride: stride in both spatial dimensions.
    padding: zero padding on every side.

  Returns:
    Output [N, H', W', C_out].
  """
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMENSION_NUMBERS)


def fold_time(x: jax.Array, fn) -> jax.Array:
  """Applies ``fn`` (which takes [N, ...]) to time-major ``x`` [S, B, ...] on the folded S*B batch."""
  steps, batch = x.shape[:2]
  y = fn(x.reshape((steps * batch,) + x.shape[2:]))
  return y.reshape((steps, batch) + y.shape[1:])


def avg_pool(x: jax.Array, window: int) -> jax.Array:
  """Non-overlapping average pooling over the two spatial axes of [..., H, W, C]."""
  *lead, h, w, c = x.shape
  h, w = h - h % window, w - w % window  # floor, as PyTorch's AvgPool2d
  x = x[..., :h, :w, :].reshape(*lead, h // window, window, w // window, window, c)
  return jnp.mean(x, axis=(-4, -2))


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """Max pooling over the two spatial axes of [N, H, W, C] with -inf padding (PyTorch semantics)."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def spatial_mean(x: jax.Array, axes: Sequence[int] = (-3, -2)) -> jax.Array:
  """Global average pooling over the spatial axes of [..., H, W, C]."""
  return jnp.mean(x, axis=tuple(axes))
