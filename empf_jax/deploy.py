"""Deployment: fold a trained network into a compact inference model and run it (docs/model.md §5).

:func:`deploy` turns any network of :func:`empf_jax.models.create` into a :class:`Deployed` model:
a static :class:`Architecture` (the network's name, every ``create()`` option and a layer layout)
and a flat dict of NumPy arrays. :func:`run` is an inference implementation of its own that reads
only those arrays; it shares no forward code with the training modules, so its agreement with the
trained network in evaluation mode checks every fold below.

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

The deployed model is a pytree (arrays as leaves, the architecture as static metadata), so it can be
passed to :func:`jax.jit` directly; :mod:`empf_jax.bundle` stores it as bytes.

Anytime inference (:func:`run_early_exit`): each example stops at the first step t at which an
:class:`ExitRule` fires on its cumulative output c_t = sum_{tau <= t} f_tau, with the input's
length as the ceiling; its prediction is argmax c_t at that step, the prediction of the all-steps
evaluation at t (docs/model.md §4).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from empf_jax import models, neurons, ops
from empf_jax.layers import (SECA, Dense, EMPFNeuron, LIFNeuron, ParallelNeuron, QConv,
                             StepBatchNorm)
from empf_jax.quantize import binary_scale, quantize_spike, ternary_codes

Params = dict[str, np.ndarray]


class DeployError(ValueError):
  """The model cannot be deployed as described (it does not match its name and options)."""


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A convolution with its BatchNorm folded in; ``weights`` is binary, ternary or float."""

  name: str
  in_features: int
  out_features: int
  kernel_size: int
  stride: int
  padding: int
  weights: str
  # BatchNorm with per-step running averages: scale and bias hold one row per time step.
  per_step: bool = False

  @property
  def kernel_shape(self) -> tuple[int, int, int, int]:
    return (self.kernel_size, self.kernel_size, self.in_features, self.out_features)


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """A full-precision fully connected layer with bias."""

  name: str
  in_features: int
  out_features: int


@dataclasses.dataclass(frozen=True)
class NeuronSpec:
  """A neuron layer: ``kind`` is ``empf``, ``parallel`` or ``lif``."""

  name: str
  kind: str
  features: int
  mem_bn: bool
  spike_bits: int | None


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """A basic block; ``seca`` is the variant the block uses (0 none, 1 SECA-I, 2 SECA-II)."""

  name: str
  act1: NeuronSpec
  conv1: ConvSpec
  act2: NeuronSpec
  conv2: ConvSpec
  shortcut: ConvSpec | None
  seca: int


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """conv -> (SECA) -> neuron, the unit of the plain networks."""

  name: str
  conv: ConvSpec
  seca: bool
  neuron: NeuronSpec


@dataclasses.dataclass(frozen=True)
class ResNetLayout:
  """Stem (+ max pooling), basic blocks, GAP, optional hidden FC + neuron, FC."""

  stem: ConvSpec
  stem_pool: bool
  blocks: tuple[BlockSpec, ...]
  hidden: DenseSpec | None
  head_neuron: NeuronSpec | None
  fc: DenseSpec


@dataclasses.dataclass(frozen=True)
class PlainLayout:
  """A chain of units ('C'), 2x2 average pooling ('M'), GAP ('G') and flattening of each step's
  input to a 1x1 map ('F', the mlp), then flatten or GAP, FC."""

  units: tuple[UnitSpec, ...]
  plan: tuple[str, ...]
  flatten: bool
  fc: DenseSpec


LAYOUTS = {"resnet": ResNetLayout, "plain": PlainLayout}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Static description of a deployed network: ``create()`` name and options, and the layout."""

  name: str
  options: tuple[tuple[str, Any], ...]
  layout: ResNetLayout | PlainLayout

  def option(self, key: str) -> Any:
    """The value of one ``create()`` option (its default for options added after a bundle was
    written)."""
    options = dict(self.options)
    if key in options:
      return options[key]
    return inspect.signature(models.create).parameters[key].default

  @property
  def time_steps(self) -> int:
    return self.option("time_steps")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["arch"])
@dataclasses.dataclass
class Deployed:
  """A deployed network: static architecture + flat dict of arrays (packed bits as uint8)."""

  arch: Architecture
  params: Params


# ---------------------------------------------------------------------------------------------
# Options and layout.


def resolve_options(name: str, **options: Any) -> dict[str, Any]:
  """Every ``create()`` option of ``name`` with defaults filled in (stem and in_channels resolved).

  Raises:
    models.ConfigError: for an unknown option or a value :func:`models.create` rejects.
  """
  signature = inspect.signature(models.create)
  allowed = [key for key in signature.parameters if key not in ("name", "rngs")]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise models.ConfigError(f"unknown create() option(s) {unknown}; allowed: {allowed}")
  missing = [key for key in allowed
             if signature.parameters[key].default is inspect.Parameter.empty and key not in options]
  if missing:
    raise models.ConfigError(f"create() option(s) {missing} are required")
  resolved = {key: options.get(key, signature.parameters[key].default) for key in allowed}
  checked = inspect.signature(models.validate).parameters
  resolved["stem"] = models.validate(name, **{k: v for k, v in resolved.items() if k in checked})
  if resolved["in_channels"] is None:
    resolved["in_channels"] = 2 if resolved["stem"] == "event" else 3
  resolved["width"] = float(resolved["width"])
  return resolved


def _dotted(*parts: Any) -> str:
  return ".".join(str(p) for p in parts)


def _conv_spec(conv: QConv, bn: StepBatchNorm, name: str) -> ConvSpec:
  return ConvSpec(name, conv.in_features, conv.out_features, conv.kernel_size, conv.stride,
                  conv.padding, conv.weights, bn.time_steps is not None)


def _neuron_spec(neuron: nnx.Module, name: str, features: int) -> NeuronSpec:
  if isinstance(neuron, ParallelNeuron):
    return NeuronSpec(name, "parallel", features, False, neuron.spike_bits)
  if isinstance(neuron, LIFNeuron):
    return NeuronSpec(name, "lif", features, False, None)
  if isinstance(neuron, EMPFNeuron):
    return NeuronSpec(name, "empf", features, neuron.mem_bn is not None, neuron.spike_bits)
  raise DeployError(f"{name}: unsupported neuron module {type(neuron).__name__}")


def _unit_spec(unit: models.ConvUnit, name: str) -> UnitSpec:
  conv = _conv_spec(unit.conv, unit.bn, _dotted(name, "conv"))
  return UnitSpec(name, conv, unit.seca is not None,
                  _neuron_spec(unit.neuron, _dotted(name, "neuron"), conv.out_features))


# Networks whose conv units are attributes: (attribute names, plan of PlainLayout).
_NAMED_UNIT_PLANS = {
    models.ConvNetSmall: (("unit1", "unit2", "unit3"), ("C", "C", "M", "C")),
    models.MLP: (("unit1", "unit2"), ("F", "C", "C")),
}


def layout_of(model: models.SpikingNetwork) -> ResNetLayout | PlainLayout:
  """Reads the layer layout of a network (works on abstract models from ``nnx.eval_shape``)."""
  if isinstance(model, models.ResNet):
    blocks = []
    for i, block in enumerate(model.blocks):
      name = _dotted("blocks", i)
      conv1 = _conv_spec(block.conv1, block.bn1, _dotted(name, "conv1"))
      shortcut = (None if block.shortcut_conv is None
                  else _conv_spec(block.shortcut_conv, block.shortcut_bn,
                                  _dotted(name, "shortcut_conv")))
      blocks.append(BlockSpec(
          name, _neuron_spec(block.act1, _dotted(name, "act1"), conv1.in_features), conv1,
          _neuron_spec(block.act2, _dotted(name, "act2"), conv1.out_features),
          _conv_spec(block.conv2, block.bn2, _dotted(name, "conv2")), shortcut,
          block.seca_variant if block.seca1 is not None else 0))
    hidden = head = None
    if model.fc_hidden is not None:
      hidden = DenseSpec("fc_hidden", model.fc_hidden.in_features, model.fc_hidden.out_features)
      head = _neuron_spec(model.head_neuron, "head_neuron", hidden.out_features)
    return ResNetLayout(_conv_spec(model.stem.conv, model.stem.bn, "stem.conv"),
                        model.stem.kind in ("imagenet", "tiny"), tuple(blocks), hidden, head,
                        DenseSpec("fc", model.fc.in_features, model.fc.out_features))
  fc = DenseSpec("fc", model.fc.in_features, model.fc.out_features)
  if isinstance(model, models.Plain):
    units = tuple(_unit_spec(unit, _dotted("units", i)) for i, unit in enumerate(model.units))
    plan = tuple(item if isinstance(item, str) else "C" for item in model.plan)
    return PlainLayout(units, plan, model.flatten, fc)
  for kind, (names, plan) in _NAMED_UNIT_PLANS.items():
    if isinstance(model, kind):
      return PlainLayout(tuple(_unit_spec(getattr(model, name), name) for name in names), plan,
                         False, fc)
  raise DeployError(f"cannot deploy a {type(model).__name__}; supported: ResNet, Plain, "
                    "ConvNetSmall, MLP networks from empf_jax.models.create")


def _variable_signature(model: nnx.Module) -> dict[str, str]:
  return {_dotted(*path): f"{type(node).__name__} {list(node.shape)}"
          for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def _first_difference(got: Any, want: Any, where: str = "") -> tuple[str, Any, Any] | None:
  """(path, got, want) of the first difference of two nested structures; layer specs are
  named by their ``name`` field."""
  if isinstance(got, dict) and isinstance(want, dict):
    if isinstance(got.get("name"), str) and got.get("name") == want.get("name"):
      where = got["name"]
    for key in sorted(set(got) | set(want), key=str):
      path = _dotted(where, key) if where else str(key)
      if key not in got or key not in want:
        return path, got.get(key), want.get(key)
      found = _first_difference(got[key], want[key], path)
      if found:
        return found
    return None
  if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)) and len(got) == len(want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      found = _first_difference(g, w, _dotted(where, i))
      if found:
        return found
    return None
  return None if got == want else (where, got, want)


def _check_matches(model: models.SpikingNetwork, name: str, options: dict[str, Any]) -> None:
  """Raises :class:`DeployError` unless ``model`` has exactly the structure create() builds."""
  reference = nnx.eval_shape(lambda: models.create(name, **options))
  for what, got, want in (
      ("layout", dataclasses.asdict(layout_of(model)), dataclasses.asdict(layout_of(reference))),
      ("variables", _variable_signature(model), _variable_signature(reference))):
    found = _first_difference(got, want)
    if found is not None:
      path, mine, theirs = found
      raise DeployError(f"the model does not match {name} with options {options}: {what} "
                        f"{path}: the model has {mine!r}, these options give {theirs!r}")


# ---------------------------------------------------------------------------------------------
# Folding.


def pack_binary(kernel: np.ndarray) -> np.ndarray:
  """Packs sign(W) (sign(0) = +1) into bits, 1 = +1, in C order of the HWIO kernel."""
  return np.packbits(np.asarray(kernel).reshape(-1) >= 0)


def pack_ternary(codes: np.ndarray) -> np.ndarray:
  """Packs codes in {-1, 0, +1} into 2 bits each: (non-zero, negative), interleaved, C order."""
  flat = np.asarray(codes).reshape(-1)
  return np.packbits(np.stack([flat != 0, flat < 0], axis=-1).reshape(-1))


def unpack_binary(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_binary`: a +-1 float32 kernel of ``shape``."""
  count = int(np.prod(shape))
  signs = jnp.unpackbits(bits, count=count).astype(jnp.float32)
  return (2.0 * signs - 1.0).reshape(shape)


def unpack_ternary(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
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
    return {f"{p}.bits": pack_ternary(codes), f"{p}.scale": _f32(a * alpha),
            f"{p}.bias": _f32(c)}
  return {f"{p}.kernel": _f32(kernel * a), f"{p}.bias": _f32(c)}


def _fold_neuron(spec: NeuronSpec, neuron: nnx.Module) -> Params:
  p = spec.name
  if spec.kind == "parallel":
    return {f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]))}
  if spec.kind == "lif":
    return {f"{p}.decay": _f32(jax.nn.sigmoid(neuron.a[...])),
            f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]) + neurons.LIF_THRESHOLD_OFFSET)}
  decay = jax.nn.sigmoid(neuron.a[...])
  out = {f"{p}.threshold": _f32(jax.nn.sigmoid(neuron.b[...]))}
  if not spec.mem_bn:
    out[f"{p}.decay"] = _f32(decay)
    return out
  gain, offset = neuron.mem_bn.folded()
  out.update({f"{p}.decay": _f32(gain * decay[:, None]), f"{p}.gain": _f32(gain),
              f"{p}.offset": _f32(offset)})
  return out


def _fold_dense(spec: DenseSpec, dense: Dense) -> Params:
  return {f"{spec.name}.kernel": _f32(dense.kernel[...]),
          f"{spec.name}.bias": _f32(dense.bias[...])}


def _fold_seca(name: str, seca: SECA) -> Params:
  return {f"{name}.kernel": _f32(seca.kernel[...]), f"{name}.bias": _f32(seca.bias[...])}


def _fold(model: models.SpikingNetwork, layout: ResNetLayout | PlainLayout) -> Params:
  params: Params = {}
  if isinstance(layout, ResNetLayout):
    params.update(_fold_conv(layout.stem, model.stem.conv, model.stem.bn))
    for spec, block in zip(layout.blocks, model.blocks, strict=True):
      params.update(_fold_neuron(spec.act1, block.act1))
      params.update(_fold_conv(spec.conv1, block.conv1, block.bn1))
      params.update(_fold_neuron(spec.act2, block.act2))
      params.update(_fold_conv(spec.conv2, block.conv2, block.bn2))
      if spec.shortcut is not None:
        params.update(_fold_conv(spec.shortcut, block.shortcut_conv, block.shortcut_bn))
      if spec.seca:
        params.update(_fold_seca(_dotted(spec.name, "seca1"), block.seca1))
        params.update(_fold_seca(_dotted(spec.name, "seca2"), block.seca2))
    if layout.hidden is not None:
      params.update(_fold_dense(layout.hidden, model.fc_hidden))
      params.update(_fold_neuron(layout.head_neuron, model.head_neuron))
  else:
    modules = (model.units if isinstance(model, models.Plain)
               else [getattr(model, spec.name) for spec in layout.units])
    for spec, unit in zip(layout.units, modules, strict=True):
      params.update(_fold_conv(spec.conv, unit.conv, unit.bn))
      if spec.seca:
        params.update(_fold_seca(_dotted(spec.name, "seca"), unit.seca))
      params.update(_fold_neuron(spec.neuron, unit.neuron))
  params.update(_fold_dense(layout.fc, model.fc))
  return params


def deploy(model: models.SpikingNetwork, name: str, **options: Any) -> Deployed:
  """Folds a trained network into its deployed form.

  Args:
    model: a network built by ``models.create(name, **options)`` (then trained).
    name: its ``create()`` name.
    **options: its ``create()`` keyword options (``num_classes`` and ``time_steps`` at least; the
      others default as in ``create()``; ``rngs`` is not an option).

  Returns:
    The deployed model; evaluation-mode BatchNorm statistics are folded in.

  Raises:
    models.ConfigError: for options ``create()`` rejects.
    DeployError: when the model's structure differs from what the options build.
  """
  resolved = resolve_options(name, **options)
  _check_matches(model, name, resolved)
  layout = layout_of(model)
  return Deployed(Architecture(name, tuple(sorted(resolved.items())), layout),
                  _fold(model, layout))


def expected_arrays(arch: Architecture) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Name -> (shape, dtype) of every array a deployed model of ``arch`` holds."""
  steps = arch.time_steps
  f32, u8 = np.dtype(np.float32), np.dtype(np.uint8)
  out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

  def conv(spec: ConvSpec):
    count = int(np.prod(spec.kernel_shape))
    rows = (steps, spec.out_features) if spec.per_step else (spec.out_features,)
    if spec.weights == "float":
      out[f"{spec.name}.kernel"] = (spec.kernel_shape, f32)
    else:
      bits = count if spec.weights == "binary" else 2 * count
      out[f"{spec.name}.bits"] = (((bits + 7) // 8,), u8)
    if spec.weights != "float" or spec.per_step:
      out[f"{spec.name}.scale"] = (rows, f32)
    out[f"{spec.name}.bias"] = (rows, f32)

  def neuron(spec: NeuronSpec):
    out[f"{spec.name}.threshold"] = ((steps,), f32)
    if spec.kind == "parallel":
      return
    if spec.mem_bn:
      for field in ("decay", "gain", "offset"):
        out[f"{spec.name}.{field}"] = ((steps, spec.features), f32)
    else:
      out[f"{spec.name}.decay"] = ((steps,), f32)

  def dense(spec: DenseSpec):
    out[f"{spec.name}.kernel"] = ((spec.in_features, spec.out_features), f32)
    out[f"{spec.name}.bias"] = ((spec.out_features,), f32)

  def seca(name: str):
    out[f"{name}.kernel"] = ((5,), f32)
    out[f"{name}.bias"] = ((), f32)

  layout = arch.layout
  if isinstance(layout, ResNetLayout):
    conv(layout.stem)
    for block in layout.blocks:
      neuron(block.act1)
      conv(block.conv1)
      neuron(block.act2)
      conv(block.conv2)
      if block.shortcut is not None:
        conv(block.shortcut)
      if block.seca:
        seca(_dotted(block.name, "seca1"))
        seca(_dotted(block.name, "seca2"))
    if layout.hidden is not None:
      dense(layout.hidden)
      neuron(layout.head_neuron)
  else:
    for unit in layout.units:
      conv(unit.conv)
      neuron(unit.neuron)
      if unit.seca:
        seca(_dotted(unit.name, "seca"))
  dense(layout.fc)
  return out


# ---------------------------------------------------------------------------------------------
# Serialisable description (used by empf_jax.bundle).


def architecture_to_dict(arch: Architecture) -> dict[str, Any]:
  """A JSON-ready description of ``arch``."""
  family = next(key for key, cls in LAYOUTS.items() if isinstance(arch.layout, cls))
  return {"name": arch.name, "options": dict(arch.options), "family": family,
          "layout": dataclasses.asdict(arch.layout)}


def _build(kind: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(kind)
  if dataclasses.is_dataclass(kind):
    if not isinstance(value, dict):
      raise ValueError(f"{where}: expected an object for {kind.__name__}, got {value!r}")
    hints = typing.get_type_hints(kind)
    fields = dataclasses.fields(kind)
    names = [f.name for f in fields]
    # Fields with a default were added later; bundles written before them omit them.
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if not set(required) <= set(value) <= set(names):
      raise ValueError(f"{where}: {kind.__name__} needs fields {sorted(required)} (optional: "
                       f"{sorted(set(names) - set(required))}), got {sorted(value)}")
    return kind(**{n: _build(hints[n], value[n], _dotted(where, n)) for n in names
                   if n in value})
  if origin in (Union, types.UnionType):
    args = typing.get_args(kind)
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _build(inner[0], value, where)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{where}: expected a list, got {value!r}")
    item = typing.get_args(kind)[0]
    return tuple(_build(item, v, _dotted(where, i)) for i, v in enumerate(value))
  if kind is bool and not isinstance(value, bool) or (
      kind in (int, str) and (not isinstance(value, kind) or isinstance(value, bool))):
    raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
  return value


def architecture_from_dict(data: dict[str, Any]) -> Architecture:
  """Inverse of :func:`architecture_to_dict`; raises ValueError for a malformed description."""
  family = data.get("family")
  if family not in LAYOUTS:
    raise ValueError(f"unknown layout family {family!r}; allowed: {sorted(LAYOUTS)}")
  name, options = data.get("name"), data.get("options")
  if not isinstance(name, str) or not isinstance(options, dict):
    raise ValueError("the description needs a string 'name' and an object 'options'")
  layout = _build(LAYOUTS[family], data.get("layout"), "layout")
  return Architecture(name, tuple(sorted(options.items())), layout)


# ---------------------------------------------------------------------------------------------
# Inference.


def layer_specs(layout: ResNetLayout | PlainLayout
                ) -> dict[str, ConvSpec | DenseSpec | NeuronSpec]:
  """Every convolution, FC layer and neuron layer of a layout by name, in forward order."""
  if isinstance(layout, ResNetLayout):
    specs = [layout.stem]
    for block in layout.blocks:
      specs += [block.act1, block.conv1, block.act2, block.conv2]
      specs += [] if block.shortcut is None else [block.shortcut]
    specs += [] if layout.hidden is None else [layout.hidden, layout.head_neuron]
  else:
    specs = [spec for unit in layout.units for spec in (unit.conv, unit.neuron)]
  return {spec.name: spec for spec in specs + [layout.fc]}


def _kernels(arch: Architecture, params: Params) -> dict[str, jax.Array]:
  """Unpacks every convolution kernel once per run: +-1 signs, ternary codes or float."""
  out = {}
  for spec in layer_specs(arch.layout).values():
    if not isinstance(spec, ConvSpec):
      continue
    if spec.weights == "binary":
      out[spec.name] = unpack_binary(params[f"{spec.name}.bits"], spec.kernel_shape)
    elif spec.weights == "ternary":
      out[spec.name] = unpack_ternary(params[f"{spec.name}.bits"], spec.kernel_shape)
    else:
      out[spec.name] = params[f"{spec.name}.kernel"]
  return out


class StepRecord(NamedTuple):
  """What one step of a deployed network computed, per example (leading axis B).

  Attributes:
    logits: the step's output f_t [B, K].
    membranes: per neuron layer, the membrane its spike is taken from (after Mem-BN; the input
      current for a parallel neuron).
    inputs: per convolution, FC layer and SECA gate, its input.
  """

  logits: jax.Array
  membranes: dict[str, jax.Array]
  inputs: dict[str, jax.Array]


# A function of each step's record, evaluated inside the time loop; every leaf of what it returns
# has the batch as its leading axis (see run and run_early_exit).
Probe = Callable[[Architecture, dict[str, jax.Array], StepRecord], Any]


class _Runner:
  """One time step of a deployed network; collects the new membranes and layer inputs."""

  def __init__(self, arch: Architecture, params: Params, kernels: dict[str, jax.Array],
               state: dict[str, jax.Array] | None, t: jax.Array, quantize_spikes: bool):
    self.arch, self.params, self.kernels = arch, params, kernels
    self.state, self.t, self.quantize_spikes = state, t, quantize_spikes
    self.new_state: dict[str, jax.Array] = {}
    self.membranes: dict[str, jax.Array] = {}
    self.inputs: dict[str, jax.Array] = {}

  def conv(self, spec: ConvSpec, x: jax.Array) -> jax.Array:
    """y = s * conv(x, W_q) + C (quantised) or conv(x, W') + C (float); with per-step
    statistics s and C are step t's rows (and a float W keeps its own scale s)."""
    self.inputs[spec.name] = x
    y = ops.conv2d(x, self.kernels[spec.name], spec.stride, spec.padding)
    scale, bias = self.params.get(f"{spec.name}.scale"), self.params[f"{spec.name}.bias"]
    if spec.per_step:
      scale, bias = scale[self.t], bias[self.t]
    if scale is not None:
      y = y * scale
    return y + bias

  def dense(self, spec: DenseSpec, x: jax.Array) -> jax.Array:
    self.inputs[spec.name] = x
    return x @ self.params[f"{spec.name}.kernel"] + self.params[f"{spec.name}.bias"]

  def seca(self, name: str, x: jax.Array) -> jax.Array:
    """x * sigmoid(conv1d_5(mean_{h,w} x) + bias), the 1-D convolution zero-padded over channels."""
    self.inputs[name] = x
    pooled = jnp.mean(x, axis=(1, 2))[..., None]
    taps = self.params[f"{name}.kernel"]
    half = taps.shape[0] // 2
    mixed = jax.lax.conv_general_dilated(pooled, taps[:, None, None], (1,), ((half, half),),
                                         dimension_numbers=("NWC", "WIO", "NWC"))[..., 0]
    return x * jax.nn.sigmoid(mixed + self.params[f"{name}.bias"])[:, None, None, :]

  def neuron(self, spec: NeuronSpec, current: jax.Array) -> jax.Array:
    """One neuron step from the folded parameters (see the module docstring)."""
    p, t = spec.name, self.t
    threshold = self.params[f"{p}.threshold"][t]
    if spec.kind == "parallel":
      membrane = current
      spike = jax.nn.relu(membrane - threshold)
    else:
      u = jnp.zeros_like(current) if self.state is None else self.state[p]
      decay = self.params[f"{p}.decay"][t]
      if spec.mem_bn:
        membrane = decay * u + self.params[f"{p}.gain"][t] * current + self.params[f"{p}.offset"][t]
      else:
        membrane = decay * u + current
      if spec.kind == "lif":
        spike = jnp.where(membrane >= threshold, threshold, 0.0)
      else:
        spike = jax.nn.relu(membrane - threshold)
      self.new_state[p] = membrane - spike
    self.membranes[p] = membrane
    if spec.spike_bits is not None and self.quantize_spikes:
      spike = quantize_spike(spike)
    return spike

  def resnet(self, layout: ResNetLayout, x: jax.Array) -> jax.Array:
    h = self.conv(layout.stem, x)
    if layout.stem_pool:
      h = ops.max_pool(h)
    for block in layout.blocks:
      y = self.conv(block.conv1, self.neuron(block.act1, h))
      if block.seca:
        y = self.seca(_dotted(block.name, "seca1"), y + h if block.seca == 2 else y)
      z = self.conv(block.conv2, self.neuron(block.act2, y))
      if block.seca:
        z = self.seca(_dotted(block.name, "seca2"), z + y if block.seca == 2 else z)
      h = z + (h if block.shortcut is None else self.conv(block.shortcut, h))
    h = ops.spatial_mean(h)
    if layout.hidden is not None:
      h = self.neuron(layout.head_neuron, self.dense(layout.hidden, h))
    return self.dense(layout.fc, h)

  def plain(self, layout: PlainLayout, x: jax.Array) -> jax.Array:
    units = iter(layout.units)
    h = x
    for item in layout.plan:
      if item == "M":
        h = ops.avg_pool(h, 2)
      elif item == "G":
        h = ops.spatial_mean(h)
      elif item == "F":
        h = h.reshape(h.shape[0], 1, 1, -1)
      else:
        unit = next(units)
        y = self.conv(unit.conv, h)
        if unit.seca:
          y = self.seca(_dotted(unit.name, "seca"), y)
        h = self.neuron(unit.neuron, y)
    if h.ndim > 2:
      h = h.reshape(h.shape[0], -1) if layout.flatten else ops.spatial_mean(h)
    return self.dense(layout.fc, h)

  def __call__(self, x: jax.Array) -> jax.Array:
    if isinstance(self.arch.layout, ResNetLayout):
      return self.resnet(self.arch.layout, x)
    return self.plain(self.arch.layout, x)


def _step(arch: Architecture, params: Params, kernels: dict[str, jax.Array],
          state: dict[str, jax.Array] | None, x_t: jax.Array, t: jax.Array,
          quantize_spikes: bool) -> tuple[StepRecord, dict[str, jax.Array]]:
  runner = _Runner(arch, params, kernels, state, t, quantize_spikes)
  logits = runner(x_t)
  return StepRecord(logits, runner.membranes, runner.inputs), runner.new_state


def _prepare(deployed: Deployed, x: jax.Array, quantize_spikes: bool
             ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], StepRecord]:
  """(float32 input, unpacked kernels, zero state, the shapes of one step's record)."""
  arch, params = deployed.arch, deployed.params
  if x.shape[0] > arch.time_steps:
    raise ValueError(f"input has {x.shape[0]} time steps; this network has T={arch.time_steps}")
  x = x.astype(jnp.float32)
  kernels = _kernels(arch, params)
  record, state = jax.eval_shape(
      lambda: _step(arch, params, kernels, None, x[0], jnp.int32(0), quantize_spikes))
  return x, kernels, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state), record


@functools.partial(jax.jit, static_argnames=("quantize_spikes", "return_membranes", "probe"))
def run(deployed: Deployed, x: jax.Array, *, quantize_spikes: bool = True,
        return_membranes: bool = False, probe: Probe | None = None) -> Any:
  """Runs a deployed network on time-major input from the zero state.

  Args:
    deployed: the deployed model.
    x: input [S, B, H, W, C] for steps 0..S-1, S <= T (static images repeated S times).
    quantize_spikes: apply the 4-bit spike code where the network uses it; False gives the
      floating-point spikes of the same membranes (for comparisons without rounding).
    return_membranes: also return, per neuron layer, the membrane the spike is taken from
      (after Mem-BN; the input current for a parallel neuron), each [S, B, ...].
    probe: ``probe(arch, kernels, record)`` evaluated at every step on its :class:`StepRecord`
      (e.g. :func:`empf_jax.efficiency.step_operations`); its outputs are stacked over the steps.

  Returns:
    Logits [S, B, K]; then the membranes and the probe's outputs [S, B, ...], when requested.
  """
  arch, params = deployed.arch, deployed.params
  x, kernels, state0, _ = _prepare(deployed, x, quantize_spikes)

  def body(state, inputs):
    x_t, t = inputs
    record, state = _step(arch, params, kernels, state, x_t, t, quantize_spikes)
    probed = None if probe is None else probe(arch, kernels, record)
    return state, (record.logits, record.membranes, probed)

  _, (logits, membranes, probed) = jax.lax.scan(body, state0, (x, jnp.arange(x.shape[0])),
                                                unroll=neurons.default_unroll())
  outputs = (logits,) + ((membranes,) if return_membranes else ())
  outputs += () if probe is None else (probed,)
  return outputs if len(outputs) > 1 else logits


# ---------------------------------------------------------------------------------------------
# Anytime inference.

EXIT_RULES = ("softmax", "margin")


@dataclasses.dataclass(frozen=True)
class ExitRule:
  """When an example may stop: a test on its mean output c_t / t, c_t = sum_{tau <= t} f_tau.

  * ``softmax``: max_k softmax(c_t / t)_k >= threshold (SEENN-I's confidence rule), threshold in
    (0, 1]. Softmax is taken of the mean, not of c_t: the loss of step t is the cross-entropy of
    f_t alone (docs/model.md §4), so the mean is on the scale training calibrates, while c_t is
    t times sharper and would pass a threshold later steps merely by repetition. Threshold 1 never
    fires (a float32 softmax rounds to exactly 1.0 once the top two means differ by about 17).
  * ``margin``: top-1 minus top-2 of c_t / t >= threshold (SNNCutoff's rule, in logit units),
    threshold >= 0, finite.

  The scaling by 1/t leaves argmax c_t, the prediction, unchanged.
  """

  kind: str
  threshold: float

  def __post_init__(self):
    if self.kind not in EXIT_RULES:
      raise ValueError(f"unknown exit rule {self.kind!r}; allowed: {', '.join(EXIT_RULES)}")
    value = self.threshold
    if self.kind == "softmax" and not 0.0 < value <= 1.0:
      raise ValueError(f"softmax exit threshold {value!r} is not in (0, 1]")
    if self.kind == "margin" and not (math.isfinite(value) and value >= 0.0):
      raise ValueError(f"margin exit threshold {value!r} is not a finite number >= 0")

  @classmethod
  def parse(cls, text: str) -> ExitRule:
    """``softmax:0.9`` or ``margin:2`` as a rule; ValueError naming the value otherwise."""
    kind, sep, value = text.partition(":")
    try:
      threshold = float(value)
    except ValueError:
      threshold = None
    if not sep or threshold is None:
      raise ValueError(f"exit rule {text!r} is not RULE:THRESHOLD with RULE one of "
                       f"{', '.join(EXIT_RULES)} (e.g. softmax:0.9, margin:2)")
    return cls(kind, threshold)

  def __str__(self) -> str:
    return f"{self.kind}:{self.threshold:g}"

  def fires(self, cumulative: jax.Array, t: jax.Array | int) -> jax.Array:
    """Whether the rule fires for cumulative outputs c_t [..., K] after t steps (t broadcasts
    against c_t[..., 0]); a boolean array [...]."""
    mean = cumulative / jnp.asarray(t, cumulative.dtype)[..., None]
    if self.kind == "softmax":
      if self.threshold >= 1.0:
        return jnp.zeros(mean.shape[:-1], bool)
      return jnp.max(jax.nn.softmax(mean, axis=-1), axis=-1) >= self.threshold
    top2 = jax.lax.top_k(mean, 2)[0]
    return top2[..., 0] - top2[..., 1] >= self.threshold


def exit_steps(logits: jax.Array, rule: ExitRule | None) -> tuple[jax.Array, jax.Array]:
  """Exit step and prediction of every example from all S steps' outputs.

  Args:
    logits: f_t for t = 1..S, [S, B, K] (as :func:`run` returns them).
    rule: the exit rule; None runs every example for all S steps.

  Returns:
    (steps [B] int32 in 1..S: the first t at which the rule fires, S if it never does;
    predictions [B]: argmax c_t at that step), as :func:`run_early_exit` computes them while
    running.
  """
  cumulative = jnp.cumsum(logits, axis=0)
  last = cumulative.shape[0]
  if rule is None:
    fired = jnp.zeros(cumulative.shape[:2], bool)
  else:
    fired = rule.fires(cumulative, jnp.arange(1, last + 1)[:, None])
  fired = fired.at[-1].set(True)
  steps = jnp.argmax(fired, axis=0).astype(jnp.int32) + 1
  final = jnp.take_along_axis(cumulative, (steps - 1)[None, :, None], axis=0)[0]
  return steps, jnp.argmax(final, axis=-1)


class EarlyExit(NamedTuple):
  """Result of :func:`run_early_exit`, per example.

  Attributes:
    predictions: argmax c_t at the exit step [B].
    steps: the steps the example ran, t in 1..S [B] (int32).
    cumulative: c_t at the exit step [B, K].
    totals: the probe's outputs summed over the steps the example ran (None without a probe).
  """

  predictions: jax.Array
  steps: jax.Array
  cumulative: jax.Array
  totals: Any


@functools.partial(jax.jit, static_argnames=("rule", "quantize_spikes", "probe"))
def run_early_exit(deployed: Deployed, x: jax.Array, rule: ExitRule | None, *,
                   quantize_spikes: bool = True, probe: Probe | None = None) -> EarlyExit:
  """Runs a deployed network step by step until every example of the batch has stopped.

  Example b stops after the first step t at which ``rule.fires(c_t)`` (or at t = S). The loop is
  a ``lax.while_loop`` that ends when all examples have stopped: at batch 1 the later steps are
  not computed at all; in a batch the stopped examples keep being computed until the slowest
  stops, masked: their c_t, step count and probe totals stay frozen at their exit step.

  Args:
    deployed: the deployed model.
    x: input [S, B, ...] for steps 0..S-1, S <= T (the ceiling).
    rule: the exit rule; None runs all S steps.
    quantize_spikes: as in :func:`run`.
    probe: as in :func:`run`; its per-example outputs are summed over the steps each example ran
      (:func:`empf_jax.efficiency.step_operations` counts the operations it performed).

  Returns:
    An :class:`EarlyExit`.
  """
  arch, params = deployed.arch, deployed.params
  x, kernels, state0, record = _prepare(deployed, x, quantize_spikes)
  last, batch = x.shape[0], x.shape[1]
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
  totals0 = None if probe is None else zeros(
      jax.eval_shape(lambda k, r: probe(arch, k, r), kernels, record))

  def body(carry):
    t, state, cumulative, done, steps, totals = carry
    record, state = _step(arch, params, kernels, state, x[t], t, quantize_spikes)
    running = ~done
    cumulative = jnp.where(running[:, None], cumulative + record.logits, cumulative)
    if probe is not None:
      totals = jax.tree.map(
          lambda total, value: total + jnp.where(
              running.reshape((batch,) + (1,) * (value.ndim - 1)), value, 0),
          totals, probe(arch, kernels, record))
    steps = jnp.where(running, t + 1, steps)
    done = done | (t + 1 == last)
    if rule is not None:
      done = done | rule.fires(cumulative, t + 1)
    return t + 1, state, cumulative, done, steps, totals

  carry = (jnp.int32(0), state0, zeros(record.logits), jnp.zeros(batch, bool),
           jnp.zeros(batch, jnp.int32), totals0)
  _, _, cumulative, _, steps, totals = jax.lax.while_loop(
      lambda carry: ~jnp.all(carry[3]), body, carry)
  return EarlyExit(jnp.argmax(cumulative, axis=-1), steps, cumulative, totals)
