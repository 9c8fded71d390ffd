"""Folding a trained network into the arrays of its deployed form (docs/model.md §1, §5).

Folds (eval mode, BN_l(z) = A z + C per channel from the running statistics):

* Binary convolution followed by BN: BN(conv(x, alpha_o sign(W))) = s_o conv(x, sign(W)) + C_o with
  s_o = A_o alpha_o. The signs are stored as packed bits (1 bit per weight, bit 1 = +1), the scale
  s and the bias C as float32 per output channel.
* Ternary convolution: W_t = alpha q with codes q in {-1, 0, +1} (tensor-wide alpha), so
  s_o = A_o alpha; each code takes 2 bits (a non-zero bit and a negative bit, bit planes
  interleaved), plus s and C per output channel.
* Full-precision convolution (stem, first VGG conv): W'[..., o] = A_o W[..., o], bias C.
* With per-step BatchNorm statistics (``step_stats``), A and C have one row per time step: the
  scale s and bias C are stored as [T, C_out] (a full-precision kernel stays unscaled and gets
  its own scale A), and step t uses row t.
* EM-PF neuron: decay lambda_t = sigma(a_t) and threshold theta_t = sigma(b_t) are stored directly.
  With Mem-BN, m_hat_t = k_t (lambda_t u_{t-1} + I_t) + h_t with
  k_t = sigma(d_t) + sigma(c_t) A_t and h_t = sigma(c_t) C_t (docs/model.md §1), stored per channel
  as decay k_t lambda_t, gain k_t and offset h_t:  m_hat_t = (k_t lambda_t) u_{t-1} + k_t I_t + h_t.
* Parallel neuron: threshold theta_t only (stateless). LIF: decay sigma(a_t) and threshold
  theta'_t = sigma(b_t) + 0.5. SECA and the fully connected layers keep their float parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from empf_jax import models, neurons
from empf_jax.deploy.schema import Architecture, Deployed, Params
from empf_jax.layers import SECA, Dense, QConv, StepBatchNorm
from empf_jax.layout import ConvSpec, DenseSpec, NeuronSpec, layout_of, modules_by_name, walk
from empf_jax.quantize import binary_scale, ternary_codes


class DeployError(ValueError):
  """The model cannot be deployed as described (it does not match its name and options)."""


def pack_binary(kernel: ArrayLike) -> np.ndarray:
  """Packs sign(W) (sign(0) = +1) into bits, 1 = +1, in C order of the HWIO kernel."""
  return np.packbits(np.asarray(kernel).reshape(-1) >= 0)


def pack_ternary(codes: ArrayLike) -> np.ndarray:
  """Packs codes in {-1, 0, +1} into 2 bits each: (non-zero, negative), interleaved, C order."""
  flat = np.asarray(codes).reshape(-1)
  return np.packbits(np.stack([flat != 0, flat < 0], axis=-1).reshape(-1))


def unpack_binary(bits: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_binary`: a +-1 float32 kernel of ``shape``."""
  count = int(np.prod(shape))
  signs = jnp.unpackbits(bits, count=count).astype(jnp.float32)
  return (2.0 * signs - 1.0).reshape(shape)


def unpack_ternary(bits: ArrayLike, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_ternary`: a float32 kernel of codes in {-1, 0, +1}."""
  count = int(np.prod(shape))
  planes = jnp.unpackbits(bits, count=2 * count).reshape(count, 2).astype(jnp.float32)
  return (planes[:, 0] * (1.0 - 2.0 * planes[:, 1])).reshape(shape)


def _f32(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _fold_conv(spec: ConvSpec, conv: QConv, bn: StepBatchNorm) -> Params:
  a, c = bn.affine()
  kernel = conv.kernel[...]
  p = spec.name
  if spec.per_step and spec.weights == "float":
    return {f"{p}.kernel": _f32(kernel), f"{p}.scale": _f32(a), f"{p}.bias": _f32(c)}
  if spec.weights == "binary":
    alpha = binary_scale(kernel).reshape(-1)
    return {f"{p}.bits": pack_binary(kernel), f"{p}.scale": _f32(a * alpha), f"{p}.bias": _f32(c)}
  if spec.weights == "ternary":
    codes, alpha = ternary_codes(kernel)
    return {f"{p}.bits": pack_ternary(codes), f"{p}.scale": _f32(a * alpha), f"{p}.bias": _f32(c)}
  return {f"{p}.kernel": _f32(kernel * a), f"{p}.bias": _f32(c)}


def _fold_neuron(spec: NeuronSpec, neuron: Any) -> Params:  # an EMPF, LIF or parallel neuron
  p = spec.name
  if spec.kind == "parallel":
    return {f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]))}
  if spec.kind == "lif":
    return {
      f"{p}.decay": _f32(jax.nn.sigmoid(neuron.a[...])),
      f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]) + neurons.LIF_THRESHOLD_OFFSET),
    }
  decay = jax.nn.sigmoid(neuron.a[...])
  out = {f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]))}
  if not spec.mem_bn:
    out[f"{p}.decay"] = _f32(decay)
    return out
  gain, offset = neuron.mem_bn.folded()
  out.update(
    {
      f"{p}.decay": _f32(gain * decay[:, None]),
      f"{p}.gain": _f32(gain),
      f"{p}.offset": _f32(offset),
    }
  )
  return out


def _fold_dense(spec: DenseSpec, dense: Dense) -> Params:
  return {
    f"{spec.name}.kernel": _f32(dense.kernel[...]),
    f"{spec.name}.bias": _f32(dense.bias[...]),
  }


def _fold_seca(name: str, seca: SECA) -> Params:
  return {f"{name}.kernel": _f32(seca.kernel[...]), f"{name}.bias": _f32(seca.bias[...])}


_FOLDS = {
  "conv": lambda layer, modules: _fold_conv(layer.spec, *modules),
  "neuron": lambda layer, modules: _fold_neuron(layer.spec, *modules),
  "dense": lambda layer, modules: _fold_dense(layer.spec, *modules),
  "seca": lambda layer, modules: _fold_seca(layer.name, *modules),
}


def fold(model: models.SpikingNetwork, arch: Architecture) -> Params:
  """The deployed arrays of ``model`` (which has the layout of ``arch``), layer by layer."""
  modules = modules_by_name(model)
  params: Params = {}
  for layer in walk(arch.layout):
    if layer.kind in _FOLDS:
      params.update(_FOLDS[layer.kind](layer, [modules[path] for path in layer.modules]))
  return params


def _variable_signature(model: nnx.Module) -> dict[str, str]:
  return {
    ".".join(map(str, path)): f"{type(node).__name__} {list(node.shape)}"
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Variable)
  }


def _first_difference(got: Any, want: Any, where: str = "") -> tuple[str, Any, Any] | None:
  """(path, got, want) of the first difference of two nested structures; layer specs are
  named by their ``name`` field."""
  if isinstance(got, dict) and isinstance(want, dict):
    if isinstance(got.get("name"), str) and got.get("name") == want.get("name"):
      where = got["name"]
    for key in sorted(set(got) | set(want), key=str):
      path = f"{where}.{key}" if where else str(key)
      if key not in got or key not in want:
        return path, got.get(key), want.get(key)
      found = _first_difference(got[key], want[key], path)
      if found:
        return found
    return None
  if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)) and len(got) == len(want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      found = _first_difference(g, w, f"{where}.{i}")
      if found:
        return found
    return None
  return None if got == want else (where, got, want)


def _check_matches(model: models.SpikingNetwork, options: models.NetOptions) -> None:
  """Raises :class:`DeployError` unless ``model`` has exactly the structure ``options`` build."""
  reference = nnx.eval_shape(lambda: models.create(options))
  for what, got, want in (
    ("layout", dataclasses.asdict(layout_of(model)), dataclasses.asdict(layout_of(reference))),
    ("variables", _variable_signature(model), _variable_signature(reference)),
  ):
    found = _first_difference(got, want)
    if found is not None:
      path, mine, theirs = found
      raise DeployError(
        f"the model does not match {options.name} with options "
        f"{options.create_options()}: {what} {path}: the model has {mine!r}, "
        f"these options give {theirs!r}"
      )


def deploy(model: models.SpikingNetwork, name: str | None = None, **options: Any) -> Deployed:
  """Folds a trained network into its deployed form.

  Args:
    model: a network built by :func:`empf_jax.models.create` (then trained).
    name: the ``create()`` name the model is meant to have, with ``options`` its keyword
      options (``num_classes`` and ``time_steps`` at least, the others default); None (the
      default) takes the network's own ``model.options``.
    **options: see ``name``.

  Returns:
    The deployed model; evaluation-mode BatchNorm statistics are folded in.

  Raises:
    models.ConfigError: for options ``create()`` rejects.
    DeployError: when the model's structure differs from what the options build.
  """
  if name is None and options:
    raise TypeError(f"deploy() got options {sorted(options)} without a network name")
  net = model.options if name is None else models.NetOptions.of(name, **options)
  _check_matches(model, net)
  arch = Architecture(net, layout_of(model))
  return Deployed(arch, fold(model, arch))
