"""A network's layers in forward order: the one description that deployment, accounting, reports
and checkpoint conversion read (docs/model.md §3, §5).

:func:`layout_of` reads a network of :mod:`empf_jax.models` into a :data:`Layout`, a static and
serialisable description of its layers (what a deployment bundle stores); :func:`walk` turns a
layout into the sequence of :class:`Layer` steps the input meets, each reading one named
register and writing one, so that residual connections need no special case:

* ResNet: stem conv (x -> h) [max pool]; per basic block act1 (h -> s), conv1 (s -> y)
  [SECA1 on y, or on y + h for SECA-II], act2 (y -> s), conv2 (s -> z) [SECA2 on z, or z + y],
  [shortcut conv (h -> r)], add (z + r or z + h -> h); spatial mean; [hidden FC, head neuron]; FC.
* Plain networks (VGG, convnet_small, convnet28, mlp): per plan item a unit conv -> [SECA] ->
  neuron, 2x2 average pooling ('M'), spatial mean ('G') or each step's input flattened to a 1x1
  map ('F'); then flattening or the spatial mean; FC.

Every convolution and FC layer also says whether it reads spikes or real-valued currents (the
input counts as spikes for a binary or ternary first convolution, which reads event frames):
docs/model.md §5 counts the synaptic operations of the two differently. Layer names are module
paths (``blocks.0.conv1``, ``unit2.neuron``), so the modules behind a layer are found by name.

Only this module and the model definitions tell the kinds of network apart: describing a new
kind means a reader here (and, if its layers differ, a layout with its own walk). The other
modules read layouts and walks; the converter's HD_LIF names are a table per layout family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

from flax import nnx

from empf_jax import models
from empf_jax.layers import EMPFNeuron, LIFNeuron, ParallelNeuron, QConv, StepBatchNorm


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


class Layer(NamedTuple):
  """One step of the forward pass.

  Attributes:
    kind: ``conv``, ``dense``, ``neuron``, ``seca`` (layers with arrays); ``max_pool`` (3x3/2),
      ``avg_pool`` (2x2), ``mean`` (spatial mean of a map, none of a vector), ``flatten`` (a map
      to a vector), ``to_map`` (a step's input to a 1x1 map), ``add`` (``source + other``).
    source: the register read; ``x`` is the step's input.
    target: the register written; the FC classifier writes ``logits``.
    name: module path of a layer with arrays, else "".
    spec: the layer's spec; for a SECA gate the convolution whose output it gates.
    other: ``add``: the other summand; a SECA-II gate: the residual added before gating.
    reads: conv and dense layers: ``spikes`` or ``currents`` (docs/model.md §5).
    modules: conv: the paths of the convolution and its BatchNorm; else (name,) or ().
  """

  kind: str
  source: str
  target: str
  name: str = ""
  spec: Any = None
  other: str | None = None
  reads: str | None = None
  modules: tuple[str, ...] = ()


def _dotted(*parts: Any) -> str:
  return ".".join(str(p) for p in parts)


def _conv(spec: ConvSpec, source: str, target: str, reads: str, bn: str) -> Layer:
  return Layer("conv", source, target, spec.name, spec, reads=reads, modules=(spec.name, bn))


def _neuron(spec: NeuronSpec, source: str, target: str) -> Layer:
  return Layer("neuron", source, target, spec.name, spec, modules=(spec.name,))


def _dense(spec: DenseSpec, source: str, target: str, reads: str) -> Layer:
  return Layer("dense", source, target, spec.name, spec, reads=reads, modules=(spec.name,))


def _seca(name: str, conv: ConvSpec, register: str, residual: str | None) -> Layer:
  return Layer("seca", register, register, name, conv, other=residual, modules=(name,))


def _sibling(path: str, leaf: str) -> str:
  """``blocks.0.conv1`` -> ``blocks.0.<leaf>``."""
  return _dotted(path.rpartition(".")[0], leaf) if "." in path else leaf


@dataclasses.dataclass(frozen=True)
class ResNetLayout:
  """Stem (+ max pooling), basic blocks, GAP, optional hidden FC + neuron, FC."""

  family: ClassVar[str] = "resnet"

  stem: ConvSpec
  stem_pool: bool
  blocks: tuple[BlockSpec, ...]
  hidden: DenseSpec | None
  head_neuron: NeuronSpec | None
  fc: DenseSpec

  def walk(self) -> tuple[Layer, ...]:
    steps = [_conv(self.stem, "x", "h", "currents", "stem.bn")]
    if self.stem_pool:
      steps.append(Layer("max_pool", "h", "h"))
    for block in self.blocks:
      steps += [
        _neuron(block.act1, "h", "s"),
        _conv(block.conv1, "s", "y", "spikes", _sibling(block.conv1.name, "bn1")),
      ]
      if block.seca:
        steps.append(
          _seca(_dotted(block.name, "seca1"), block.conv1, "y", "h" if block.seca == 2 else None)
        )
      steps += [
        _neuron(block.act2, "y", "s"),
        _conv(block.conv2, "s", "z", "spikes", _sibling(block.conv2.name, "bn2")),
      ]
      if block.seca:
        steps.append(
          _seca(_dotted(block.name, "seca2"), block.conv2, "z", "y" if block.seca == 2 else None)
        )
      shortcut = "h"
      if block.shortcut is not None:
        shortcut = "r"
        steps.append(
          _conv(block.shortcut, "h", "r", "currents", _sibling(block.shortcut.name, "shortcut_bn"))
        )
      steps.append(Layer("add", "z", "h", other=shortcut))
    steps.append(Layer("mean", "h", "h"))
    reads = "currents"
    if self.hidden is not None and self.head_neuron is not None:
      steps += [_dense(self.hidden, "h", "h", "currents"), _neuron(self.head_neuron, "h", "h")]
      reads = "spikes"
    return tuple(steps + [_dense(self.fc, "h", "logits", reads)])


@dataclasses.dataclass(frozen=True)
class PlainLayout:
  """A chain of units ('C'), 2x2 average pooling ('M'), GAP ('G') and flattening of each step's
  input to a 1x1 map ('F', the mlp), then flatten or GAP, FC."""

  family: ClassVar[str] = "plain"

  units: tuple[UnitSpec, ...]
  plan: tuple[str, ...]
  flatten: bool
  fc: DenseSpec

  def walk(self) -> tuple[Layer, ...]:
    units = iter(self.units)
    steps, source, holds = [], "x", "input"
    for item in self.plan:
      if item != "C":
        steps.append(Layer({"M": "avg_pool", "G": "mean", "F": "to_map"}[item], source, "h"))
      else:
        unit = next(units)
        reads = (
          holds if holds != "input" else ("currents" if unit.conv.weights == "float" else "spikes")
        )
        steps.append(_conv(unit.conv, source, "h", reads, _dotted(unit.name, "bn")))
        if unit.seca:
          steps.append(_seca(_dotted(unit.name, "seca"), unit.conv, "h", None))
        steps.append(_neuron(unit.neuron, "h", "h"))
        holds = "spikes"
      source = "h"
    steps.append(Layer("flatten" if self.flatten else "mean", source, "h"))
    return tuple(steps + [_dense(self.fc, "h", "logits", holds)])


Layout = ResNetLayout | PlainLayout
LAYOUTS = {cls.family: cls for cls in (ResNetLayout, PlainLayout)}


def walk(layout: Layout) -> tuple[Layer, ...]:
  """The layers of ``layout`` in the order the input meets them (see the module docstring)."""
  return layout.walk()


# ---------------------------------------------------------------------------------------------
# Reading a network.


def _conv_spec(conv: QConv, bn: StepBatchNorm, name: str) -> ConvSpec:
  return ConvSpec(
    name,
    conv.in_features,
    conv.out_features,
    conv.kernel_size,
    conv.stride,
    conv.padding,
    conv.weights,
    bn.time_steps is not None,
  )


def _neuron_spec(neuron: nnx.Module, name: str, features: int) -> NeuronSpec:
  if isinstance(neuron, ParallelNeuron):
    return NeuronSpec(name, "parallel", features, False, neuron.spike_bits)
  if isinstance(neuron, LIFNeuron):
    return NeuronSpec(name, "lif", features, False, None)
  if isinstance(neuron, EMPFNeuron):
    return NeuronSpec(name, "empf", features, neuron.mem_bn is not None, neuron.spike_bits)
  raise TypeError(f"{name}: no layout for the neuron module {type(neuron).__name__}")


def _unit_spec(unit: models.ConvUnit, name: str) -> UnitSpec:
  conv = _conv_spec(unit.conv, unit.bn, _dotted(name, "conv"))
  return UnitSpec(
    name,
    conv,
    unit.seca is not None,
    _neuron_spec(unit.neuron, _dotted(name, "neuron"), conv.out_features),
  )


def _fc(model: Any) -> DenseSpec:  # every network but the ResNets (their fc: _resnet)
  return DenseSpec("fc", model.fc.in_features, model.fc.out_features)


def _resnet(model: models.ResNet) -> ResNetLayout:
  blocks = []
  for i, block in enumerate(model.blocks):
    name = _dotted("blocks", i)
    conv1 = _conv_spec(block.conv1, block.bn1, _dotted(name, "conv1"))
    shortcut = (
      None
      if block.shortcut_conv is None or block.shortcut_bn is None
      else _conv_spec(block.shortcut_conv, block.shortcut_bn, _dotted(name, "shortcut_conv"))
    )
    blocks.append(
      BlockSpec(
        name,
        _neuron_spec(block.act1, _dotted(name, "act1"), conv1.in_features),
        conv1,
        _neuron_spec(block.act2, _dotted(name, "act2"), conv1.out_features),
        _conv_spec(block.conv2, block.bn2, _dotted(name, "conv2")),
        shortcut,
        block.seca_variant if block.seca1 is not None else 0,
      )
    )
  hidden = head = None
  if model.fc_hidden is not None and model.head_neuron is not None:
    hidden = DenseSpec("fc_hidden", model.fc_hidden.in_features, model.fc_hidden.out_features)
    head = _neuron_spec(model.head_neuron, "head_neuron", hidden.out_features)
  return ResNetLayout(
    _conv_spec(model.stem.conv, model.stem.bn, "stem.conv"),
    model.stem.kind in ("imagenet", "tiny"),
    tuple(blocks),
    hidden,
    head,
    _fc(model),
  )


def _plain(model: models.Plain) -> PlainLayout:
  units = tuple(_unit_spec(unit, _dotted("units", i)) for i, unit in enumerate(model.units))
  plan = tuple(item if isinstance(item, str) else "C" for item in model.plan)
  return PlainLayout(units, plan, model.flatten, _fc(model))


def _named_units(names: tuple[str, ...], plan: tuple[str, ...]):
  """A network whose conv units are the attributes ``names``, run in ``plan`` order."""
  return lambda model: PlainLayout(
    tuple(_unit_spec(getattr(model, name), name) for name in names), plan, False, _fc(model)
  )


# The reader of each network class of empf_jax.models.
_READERS = {
  models.ResNet: _resnet,
  models.Plain: _plain,
  models.ConvNetSmall: _named_units(("unit1", "unit2", "unit3"), ("C", "C", "M", "C")),
  models.MLP: _named_units(("unit1", "unit2"), ("F", "C", "C")),
}


def layout_of(model: nnx.Module) -> Layout:
  """Reads the layer layout of a network (works on abstract models from ``nnx.eval_shape``).

  Raises:
    TypeError: for a module that is none of the networks of :mod:`empf_jax.models`.
  """
  reader = _READERS.get(type(model))
  if reader is None:
    raise TypeError(
      f"no layout for a {type(model).__name__}; supported: "
      + ", ".join(cls.__name__ for cls in _READERS)
    )
  return reader(model)


def modules_by_name(model: nnx.Module) -> dict[str, Any]:
  """Every submodule of ``model`` by its dotted path (the names of :class:`Layer`); typed ``Any``:
  the readers know from the :class:`Layer` which module class a name holds."""
  return {
    _dotted(*path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
  }
