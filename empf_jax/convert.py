"""PyTorch state dicts <-> empf_jax networks (no file I/O: dicts of arrays in and out).

:func:`load_torch_state_dict` fills a network built by :func:`empf_jax.models.create` from a
PyTorch ``state_dict`` (values: numpy arrays, or anything ``np.asarray`` accepts);
:func:`to_torch_state_dict` is the reverse. Two key layouts are understood.

``reference``: the PyTorch reference model ``benchmarks/torch_reference.py``. A key is the JAX
module path joined by dots plus PyTorch's leaf name, for every network of :mod:`empf_jax.models`:

==================================  ========================================================
JAX variable                        PyTorch key (shape)
==================================  ========================================================
``<conv>.kernel`` [kh,kw,i,o]       ``<conv>.weight`` [o,i,kh,kw]
``<fc>.kernel`` [i,o]; ``.bias``    ``<fc>.weight`` [o,i]; ``<fc>.bias``
``<bn>.scale/bias/mean/var``        ``<bn>.weight/bias/running_mean/running_var``
                                    (+ ``<bn>.num_batches_tracked``, ignored)
``<neuron>.a`` / ``.b`` [T]         ``<neuron>.a`` / ``.b``
``<neuron>.mem_bn.c`` / ``.d``      ``<neuron>.mem_bn.c`` / ``.d``
``<neuron>.mem_bn.scale[t]``        ``<neuron>.mem_bn.bn.<t>.weight`` (likewise bias, stats)
``<seca>.kernel`` [5]; ``.bias``    ``<seca>.conv.weight`` [1,1,5]; ``<seca>.conv.bias`` [1]
==================================  ========================================================

``hd_lif``: the authors' code (github.com/hzc1208/HD_LIF, files ``resnet.py``, ``vgg.py``,
``modules.py``; their training script saves ``{'model': state_dict, ...}``, pass the inner dict).
Tensor layouts and the conv/FC/BN/SECA leaf names as above; the other names differ:

==================================  ==============================================
JAX                                 HD_LIF
==================================  ==============================================
``stem.conv`` / ``stem.bn``         ``conv1`` / ``bn1``
``blocks.<i>`` (stage s, index j)   ``layer<s>.<j>`` (ResNet-19 starts at ``layer2``)
block ``act1`` / ``act2``           ``act1`` / ``act2``
block ``conv1``, ``bn1``            ``conv1.0``, ``conv1.1`` (likewise ``conv2``)
block ``seca1`` / ``seca2``         ``attn1`` / ``attn2``
block ``shortcut_conv`` / ``_bn``   ``downsample.0`` / ``downsample.1``
``fc`` (ResNet-18/34)               ``fc``
ResNet-19 ``fc_hidden``             ``fc.0``
ResNet-19 ``head_neuron``, ``fc``   ``fc.1``, ``fc.2``
VGG ``units.<u>.conv`` / ``.bn``    ``layer<s>.<k>`` / ``layer<s>.<k+1>``, k = the unit's
                                    position in the authors' stage list
VGG ``.seca``, ``.neuron``          the next positions (``.neuron`` at k+2 without SECA)
VGG ``fc``                          ``classifier``
EM-PF ``a``, ``b``                  ``alpha``, ``v_th``
Mem-BN ``c``, ``d``, BN_t           ``bn_ratio``, ``mem_ratio``, ``bn.<t>`` (on the neuron)
parallel ``b``; LIF ``a``, ``b``    ``v_th``; ``alpha``, ``v_th``
ternary conv                        also ``weight_clip_val`` = [-1, 1] (checked)
==================================  ==============================================

The authors' parallel neuron never advances its step counter, so their trained networks use
v_th[0] at every step (docs/model.md §1); by default the loader copies v_th[0] to all steps so that
the JAX network computes what theirs did (``parallel_threshold="per_step"`` reads v_th[t]).
Their SECA-II keeps the ``out +`` term inside the second gate of blocks whose channels change,
where the method (and :mod:`empf_jax.models`) falls back to SECA-I; ``--use_eca 2`` checkpoints
therefore compute differently in those blocks. ``convnet_small`` has no counterpart there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from empf_jax import layers, models
from empf_jax.layout import PlainLayout, ResNetLayout, layout_of

LAYOUTS = ("reference", "hd_lif")
PARALLEL_THRESHOLDS = ("first", "per_step")
TERNARY_CLIP = (-1.0, 1.0)

_HD_LIF_BLOCK = {
  "act1": "act1",
  "act2": "act2",
  "conv1": "conv1.0",
  "bn1": "conv1.1",
  "conv2": "conv2.0",
  "bn2": "conv2.1",
  "seca1": "attn1",
  "seca2": "attn2",
  "shortcut_conv": "downsample.0",
  "shortcut_bn": "downsample.1",
}
# The authors' VGG stage lists ('G' = their 'MM', global average pooling); flattened they equal
# the plans of empf_jax.models. Keyed by the plan of the network's layout (units as 'C').
_HD_LIF_VGG_STAGES = {
  tuple("C" if isinstance(item, int) else item for item in plan): tuple(
    tuple("C" if isinstance(item, int) else item for item in stage) for stage in stages
  )
  for plan, stages in (
    (models.VGG11_PLAN, ((64,), (128, "M"), (256, 256, "M"), (512, 512, "M"), (512, 512, "M"))),
    (
      models.VGG13_PLAN,
      ((64,), (64, "M", 128, 128, "M"), (256, 256, "M"), (512, 512, 512, "M"), (512, "G")),
    ),
  )
}


class CheckpointError(ValueError):
  """A state dict that does not fit the network: missing, unexpected or mis-shaped keys."""


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One PyTorch tensor and where it lives in the JAX network.

  ``kind`` fixes the layout change: ``conv`` (HWIO <-> OIHW), ``dense`` ([in, out] <-> [out, in]),
  ``copy``, ``seca_kernel`` ([5] <-> [1, 1, 5]), ``seca_bias`` ([] <-> [1]). ``row`` selects one
  time step of a per-step [T, C] variable (Mem-BN); ``broadcast_first`` fills all T entries of a
  [T] variable from entry 0 of the PyTorch tensor (the authors' parallel-neuron thresholds).
  """

  key: str
  variable: nnx.Variable
  kind: str = "copy"
  row: int | None = None
  broadcast_first: bool = False

  def jax_shape(self) -> tuple[int, ...]:
    shape = tuple(self.variable.shape)
    return shape[1:] if self.row is not None else shape

  def torch_shape(self) -> tuple[int, ...]:
    shape = self.jax_shape()
    if self.kind == "conv":
      kh, kw, cin, cout = shape
      return (cout, cin, kh, kw)
    if self.kind == "dense":
      return shape[::-1]
    if self.kind == "seca_kernel":
      return (1, 1) + shape
    if self.kind == "seca_bias":
      return (1,)
    return shape

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    """A fresh, writable, C-contiguous array (``torch.from_numpy`` accepts it as is)."""
    if self.row is not None:
      value = value[self.row]
    if self.kind == "conv":
      value = value.transpose(3, 2, 0, 1)
    elif self.kind == "dense":
      value = value.T
    return np.array(value.reshape(self.torch_shape()), order="C")

  def from_torch(self, value: np.ndarray) -> np.ndarray:
    if self.kind == "conv":
      return value.transpose(2, 3, 1, 0)
    if self.kind == "dense":
      return value.T
    return value.reshape(self.jax_shape())


@dataclasses.dataclass(frozen=True)
class _Constant:
  """A PyTorch buffer with no JAX counterpart: written on export, validated (if given) on load."""

  key: str
  value: np.ndarray
  check: Callable[[np.ndarray], bool] | None = None
  expectation: str = ""


def _bn_slots(prefix: str, bn: layers.StepBatchNorm) -> tuple[list[_Slot], list[_Constant]]:
  slots = [
    _Slot(prefix + "weight", bn.scale),
    _Slot(prefix + "bias", bn.bias),
    _Slot(prefix + "running_mean", bn.mean),
    _Slot(prefix + "running_var", bn.var),
  ]
  return slots, [_Constant(prefix + "num_batches_tracked", np.array(0, np.int64))]


def _mem_bn_slots(
  prefix: str, mem_bn: layers.MemBN, gates: tuple[str, str]
) -> tuple[list[_Slot], list[_Constant]]:
  slots = [_Slot(prefix + gates[0], mem_bn.c), _Slot(prefix + gates[1], mem_bn.d)]
  constants = []
  for t in range(mem_bn.time_steps):
    bn = f"{prefix}bn.{t}."
    for leaf, variable in (
      ("weight", mem_bn.scale),
      ("bias", mem_bn.bias),
      ("running_mean", mem_bn.mean),
      ("running_var", mem_bn.var),
    ):
      slots.append(_Slot(bn + leaf, variable, row=t))
    constants.append(_Constant(bn + "num_batches_tracked", np.array(0, np.int64)))
  return slots, constants


# Modules that own variables; Mem-BN is named together with its neuron.
_LEAF_MODULES = (
  layers.QConv,
  layers.Dense,
  layers.StepBatchNorm,
  layers.SECA,
  layers.EMPFNeuron,
  layers.ParallelNeuron,
  layers.LIFNeuron,
)


def _module_slots(
  module: nnx.Module, prefix: str, layout: str, parallel_threshold: str
) -> tuple[list[_Slot], list[_Constant]]:
  """The PyTorch tensors of one module of :data:`_LEAF_MODULES`."""
  authors = layout == "hd_lif"
  if isinstance(module, layers.QConv):
    constants = []
    if authors and module.weights == "ternary":
      constants.append(
        _Constant(
          prefix + "weight_clip_val",
          np.array(TERNARY_CLIP, np.float32),
          lambda v: v.shape == (2,) and np.allclose(v, TERNARY_CLIP),
          f"{list(TERNARY_CLIP)} (the only clip range supported)",
        )
      )
    return [_Slot(prefix + "weight", module.kernel, "conv")], constants
  if isinstance(module, layers.Dense):
    return [
      _Slot(prefix + "weight", module.kernel, "dense"),
      _Slot(prefix + "bias", module.bias),
    ], []
  if isinstance(module, layers.StepBatchNorm):
    return _bn_slots(prefix, module)
  if isinstance(module, layers.SECA):
    return [
      _Slot(prefix + "conv.weight", module.kernel, "seca_kernel"),
      _Slot(prefix + "conv.bias", module.bias, "seca_bias"),
    ], []
  if isinstance(module, layers.EMPFNeuron):
    slots = [
      _Slot(prefix + ("alpha" if authors else "a"), module.a),
      _Slot(prefix + ("v_th" if authors else "b"), module.b),
    ]
    constants = []
    if module.mem_bn is not None:
      if authors:
        more, constants = _mem_bn_slots(prefix, module.mem_bn, ("bn_ratio", "mem_ratio"))
      else:
        more, constants = _mem_bn_slots(prefix + "mem_bn.", module.mem_bn, ("c", "d"))
      slots += more
    return slots, constants
  if isinstance(module, layers.ParallelNeuron):
    first = authors and parallel_threshold == "first"
    return [_Slot(prefix + ("v_th" if authors else "b"), module.b, broadcast_first=first)], []
  if isinstance(module, layers.LIFNeuron):
    return [
      _Slot(prefix + ("alpha" if authors else "a"), module.a),
      _Slot(prefix + ("v_th" if authors else "b"), module.b),
    ], []
  raise TypeError(f"no PyTorch naming for {type(module).__name__}")


def _resnet_prefixes(layout: ResNetLayout) -> dict[tuple[Any, ...], str]:
  """Authors' names of a ResNet's top-level modules and blocks."""
  names: dict[tuple[Any, ...], str] = {("stem", "conv"): "conv1", ("stem", "bn"): "bn1"}
  if layout.hidden is None:
    names[("fc",)] = "fc"
    stage = 0
  else:
    names.update({("fc_hidden",): "fc.0", ("head_neuron",): "fc.1", ("fc",): "fc.2"})
    stage = 1  # ResNet-19 has no 64-wide stage: the authors leave layer1 empty.
  index = 0
  for i, block in enumerate(layout.blocks):
    # Every stage after the first opens with a strided block, which has the 1x1 shortcut.
    if i == 0 or block.shortcut is not None:
      stage, index = stage + 1, 0
    names[("blocks", i)] = f"layer{stage}.{index}"
    index += 1
  return names


def _vgg_prefixes(layout: PlainLayout) -> dict[tuple[Any, ...], str] | None:
  """Authors' names of a VGG's conv units (conv, BN, optional SECA, neuron share one list);
  None for a plan the authors have no VGG of."""
  stages = _HD_LIF_VGG_STAGES.get(layout.plan)
  if stages is None:
    return None
  names: dict[tuple[Any, ...], str] = {("fc",): "classifier"}
  unit = 0
  for s, stage in enumerate(stages, start=1):
    position = 0
    for item in stage:
      if item != "C":
        position += 1
        continue
      parts = ["conv", "bn"] + (["seca"] if layout.units[unit].seca else []) + ["neuron"]
      for offset, part in enumerate(parts):
        names[("units", unit, part)] = f"layer{s}.{position + offset}"
      position += len(parts)
      unit += 1
  return names


# The authors' names, by layout family (empf_jax.layout.LAYOUTS).
_HD_LIF_PREFIXES: dict[str, Callable[[Any], dict[tuple[Any, ...], str] | None]] = {
  "resnet": _resnet_prefixes,
  "plain": _vgg_prefixes,
}


def _hd_lif_prefix(names: Mapping[tuple[Any, ...], str], path: tuple[Any, ...]) -> str:
  for cut in range(len(path), 0, -1):
    head = names.get(tuple(path[:cut]))
    if head is None:
      continue
    rest = list(path[cut:])
    if rest and path[0] == "blocks" and cut == 2:
      rest[0] = _HD_LIF_BLOCK[rest[0]]
    rest = [part for part in rest if part != "mem_bn"]
    return ".".join([head] + [str(part) for part in rest]) + "."
  raise CheckpointError(
    "layout 'hd_lif' has no name for the JAX module " + "/".join(map(str, path))
  )


def _slots(
  model: nnx.Module, layout: str, parallel_threshold: str
) -> tuple[list[_Slot], list[_Constant]]:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
  if parallel_threshold not in PARALLEL_THRESHOLDS:
    raise ValueError(
      f"parallel_threshold={parallel_threshold!r} is not allowed; allowed: "
      + ", ".join(PARALLEL_THRESHOLDS)
    )
  if layout == "hd_lif":
    network = layout_of(model)
    names = _HD_LIF_PREFIXES[network.family](network)
    if names is None:
      raise CheckpointError(
        f"layout 'hd_lif' has no counterpart of {type(model).__name__}; "
        "it covers resnet18/19/34, vgg11, vgg13 and vgg_snn"
      )

    def prefix(path):
      return _hd_lif_prefix(names, path)
  else:

    def prefix(path):
      return ".".join(str(part) for part in path) + "."

  slots, constants = [], []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, _LEAF_MODULES):
      more, fixed = _module_slots(module, prefix(path), layout, parallel_threshold)
      slots += more
      constants += fixed
  covered = {id(slot.variable) for slot in slots}
  for path, value in nnx.iter_graph(model):
    if (
      isinstance(value, nnx.Variable)
      and not isinstance(value, nnx.Intermediate)
      and id(value) not in covered
    ):
      raise CheckpointError(
        f"no PyTorch name for the JAX variable {'/'.join(map(str, path))} "
        f"({type(value).__name__}) in layout {layout!r}"
      )
  return slots, constants


def expected_keys(model: nnx.Module, *, layout: str = "reference") -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape that :func:`load_torch_state_dict` requires for ``model``."""
  slots, _ = _slots(model, layout, "per_step")
  return {slot.key: slot.torch_shape() for slot in slots}


def load_torch_state_dict(
  model: nnx.Module,
  state_dict: Mapping[str, Any],
  *,
  layout: str = "reference",
  parallel_threshold: str = "first",
) -> nnx.Module:
  """Fills ``model`` in place from a PyTorch state dict; returns it.

  Latent (unquantised) weights are copied; the network quantises them in its forward pass as the
  PyTorch code does. Buffers without a JAX counterpart (``num_batches_tracked``) are ignored;
  ``weight_clip_val`` of the authors' ternary convs must be [-1, 1].

  Args:
    model: a network from :func:`empf_jax.models.create` with the checkpoint's architecture.
    state_dict: PyTorch key -> array (numpy arrays or CPU tensors).
    layout: ``reference`` (benchmarks/torch_reference.py) or ``hd_lif`` (the authors' code).
    parallel_threshold: ``first`` or ``per_step``; how ``hd_lif`` parallel-neuron thresholds are
      read (see the module docstring). Ignored by the reference layout.

  Returns:
    ``model``.

  Raises:
    CheckpointError: listing every missing, unexpected and mis-shaped key; nothing is written then.
  """
  slots, constants = _slots(model, layout, parallel_threshold)
  if isinstance(state_dict.get("model"), Mapping):
    raise CheckpointError(
      "got a training checkpoint ({'model': ..., ...}); pass its 'model' entry, the state dict"
    )
  given = {key: np.asarray(value) for key, value in state_dict.items()}
  wanted = {slot.key for slot in slots}
  optional = {constant.key: constant for constant in constants}
  missing = sorted(wanted - given.keys())
  unexpected = sorted(given.keys() - wanted - optional.keys())
  problems = []
  for slot in slots:
    if slot.key in given:
      shape = (slot.variable.shape[0],) if slot.broadcast_first else slot.torch_shape()
      if given[slot.key].shape != shape:
        problems.append(f"{slot.key}: shape {given[slot.key].shape}, expected {shape}")
  for key, constant in optional.items():
    if key in given and constant.check is not None and not constant.check(given[key]):
      problems.append(f"{key}: value {given[key].tolist()}, expected {constant.expectation}")
  if missing or unexpected or problems:
    lines = [f"state dict does not fit {type(model).__name__} in layout {layout!r}:"]
    for title, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mismatched", problems),
    ):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise CheckpointError("\n".join(lines))

  values: dict[int, np.ndarray] = {}
  for slot in slots:
    source = given[slot.key]
    if slot.broadcast_first:
      values[id(slot.variable)] = np.full(slot.variable.shape, source[0])
    elif slot.row is None:
      values[id(slot.variable)] = slot.from_torch(source)
    else:
      rows = values.setdefault(id(slot.variable), np.array(slot.variable[...]))
      rows[slot.row] = slot.from_torch(source)
  for slot in slots:
    slot.variable[...] = np.asarray(values[id(slot.variable)], dtype=slot.variable.dtype)
  return model


def to_torch_state_dict(model: nnx.Module, *, layout: str = "reference") -> dict[str, np.ndarray]:
  """The PyTorch state dict (numpy arrays) of ``model`` in ``layout``; inverse of
  :func:`load_torch_state_dict` (with ``parallel_threshold="per_step"``).

  ``num_batches_tracked`` is written as 0: with momentum 0.1 PyTorch does not read it.
  """
  slots, constants = _slots(model, layout, "per_step")
  out = {slot.key: slot.to_torch(np.asarray(slot.variable[...])) for slot in slots}
  out.update({constant.key: constant.value.copy() for constant in constants})
  return out
