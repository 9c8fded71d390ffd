"""What a deployed network is: its :class:`Architecture` (the network's options and layer layout),
the arrays that architecture needs, and its JSON description (docs/model.md §5).

The JSON form is what :mod:`empf_jax.bundle` stores: ``{"name", "options", "family", "layout"}``
with the options of :class:`empf_jax.models.NetOptions` (but the name) and the layout's specs as
nested objects. Options and spec fields added after a bundle was written are absent from it and
read as their defaults, so older bundles keep loading.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Union

import jax
import numpy as np

from empf_jax import models
from empf_jax.layout import LAYOUTS, ConvSpec, DenseSpec, Layout, NeuronSpec, walk

Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Static description of a deployed network: its options and its layer layout."""

  options: models.NetOptions
  layout: Layout

  @property
  def name(self) -> str:
    return self.options.name

  @property
  def time_steps(self) -> int:
    return self.options.time_steps


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["arch"])
@dataclasses.dataclass
class Deployed:
  """A deployed network: static architecture + flat dict of arrays (packed bits as uint8)."""

  arch: Architecture
  params: Params


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

  shapes: dict[str, Callable[[Any], None]] = {"conv": conv, "neuron": neuron, "dense": dense}
  for layer in walk(arch.layout):
    if layer.kind == "seca":
      out[f"{layer.name}.kernel"] = ((5,), f32)
      out[f"{layer.name}.bias"] = ((), f32)
    elif layer.kind in shapes:
      shapes[layer.kind](layer.spec)
  return out


def architecture_to_dict(arch: Architecture) -> dict[str, Any]:
  """A JSON-ready description of ``arch``."""
  return {
    "name": arch.name,
    "options": arch.options.create_options(),
    "family": arch.layout.family,
    "layout": dataclasses.asdict(arch.layout),
  }


def _dotted(*parts: Any) -> str:
  return ".".join(str(p) for p in parts)


def _build(kind: Any, value: Any, where: str) -> Any:
  origin = typing.get_origin(kind)
  if isinstance(kind, type) and dataclasses.is_dataclass(kind):
    if not isinstance(value, dict):
      raise ValueError(f"{where}: expected an object for {kind.__name__}, got {value!r}")
    hints = typing.get_type_hints(kind)
    fields = dataclasses.fields(kind)
    names = [f.name for f in fields]
    # Fields with a default were added later; bundles written before them omit them.
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if not set(required) <= set(value) <= set(names):
      raise ValueError(
        f"{where}: {kind.__name__} needs fields {sorted(required)} (optional: "
        f"{sorted(set(names) - set(required))}), got {sorted(value)}"
      )
    return kind(**{n: _build(hints[n], value[n], _dotted(where, n)) for n in names if n in value})
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
  if (kind is bool and not isinstance(value, bool)) or (
    kind in (int, str) and (not isinstance(value, kind) or isinstance(value, bool))
  ):
    raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
  return value


def architecture_from_dict(data: dict[str, Any]) -> Architecture:
  """Inverse of :func:`architecture_to_dict`; raises ValueError for a malformed description
  (:class:`empf_jax.models.ConfigError`, a ValueError, for options the library rejects)."""
  family = data.get("family")
  if family not in LAYOUTS:
    raise ValueError(f"unknown layout family {family!r}; allowed: {sorted(LAYOUTS)}")
  name, options = data.get("name"), data.get("options")
  if not isinstance(name, str) or not isinstance(options, dict):
    raise ValueError("the description needs a string 'name' and an object 'options'")
  layout = _build(LAYOUTS[family], data.get("layout"), "layout")
  return Architecture(models.NetOptions.of(name, **options), layout)
