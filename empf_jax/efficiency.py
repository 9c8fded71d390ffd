"""Firing rates, synaptic and neuron operations, and energy estimates (docs/model.md §5).

Counts come from one evaluation run with the modules' recording hooks on: every :class:`QConv` and
:class:`Dense` sows its input, every neuron its spikes (:func:`recorded_run`). Each batch is counted
inside one jitted function, so only per-layer sums leave the device. All figures are per
sample (input example), summed over the time steps run.

Synaptic operations of a layer with input x_t (steps t, kernel W, stride, padding)::

    ops = sum_t sum_{inputs i} 1[x_t[i] != 0] * fanout(i),
    fanout(i) = number of (output position, output channel) pairs whose kernel window covers i
                through a non-zero weight,

computed exactly (borders, strides) as sum(conv(1[x_t != 0], 1[W != 0])): every output sums the
inputs its window covers. Binary and float kernels have no zero weights; ternary zeros are skipped.

* Layers fed by spikes (block convolutions, VGG convolutions after the first, FC layers reading
  neurons; the binarised first VGG-SNN convolution reading event frames) count only non-zero inputs:
  these are the SOPs.
* Layers fed by real-valued currents (the stem, the 1x1 shortcut convolutions reading the residual
  stream, the FC head of ResNet-18/34 and the hidden FC of ResNet-19, both reading the pooled
  stream) count every input: 1[x != 0] is replaced by 1. ResNet-19's last FC reads spikes.
* An operation is an accumulate (AC) when the weights are binary or ternary (a +-1 weight adds or
  subtracts its input; the per-channel scale is applied once per output) and a multiply-accumulate
  (MAC) with float weights: floating-point spikes need a real multiply.

Neuron operations per neuron per step: EM-PF 1 multiply + 2 additions (leak, integrate,
threshold); with Mem-BN folded one more multiply and addition (per-channel gain and offset);
parallel neuron 1 addition (threshold); LIF the same as EM-PF (leak, integrate, threshold compare;
the reset is counted as the threshold addition). The 4-bit spike code, pooling, and the folded
per-channel scale and bias of each convolution are not counted. SECA (if present) counts H W C
additions (pooling), 5 C MACs (the 1-D convolution) and H W C multiplies (the gate) per step.

Energy at 45 nm: 0.9 pJ per AC (addition), 4.6 pJ per MAC, so 3.7 pJ per lone multiply.
Two columns:

* **authors**: SOPs x 0.9 pJ only (spike-fed synaptic operations, whatever their weights), the
  convention of the EM-PF authors; with 4-bit spikes divided by 8 (32-bit over 4-bit spike words),
  as they count it.
* **full**: every synaptic operation at its AC or MAC price (stem, shortcuts, heads included), plus
  the neuron operations and SECA; no 4-bit discount.

A deployed network is counted by the same rules, per example and step, from the inputs and
membranes its own runner computes (:func:`step_operations`, a probe of
:func:`empf_jax.deploy.run` and :func:`empf_jax.deploy.run_early_exit`): with early exit an
example's operations and energy are the sums over the steps it ran.

:func:`layer_rows` flattens a :class:`Report` into one :class:`LayerRow` per layer in forward
order and :func:`to_markdown` renders it (the table ``python -m experiments.deploy`` writes as
``efficiency.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx

from empf_jax import deploy, ops
from empf_jax.layers import SECA_TAPS, QConv, set_recording
from empf_jax.layout import ConvSpec, Layer, Layout, NeuronSpec, layout_of, modules_by_name, walk
from empf_jax.models import SpikingNetwork
from empf_jax.quantize import ternary_codes

AC_ENERGY_PJ = 0.9
MAC_ENERGY_PJ = 4.6
MUL_ENERGY_PJ = MAC_ENERGY_PJ - AC_ENERGY_PJ
FOUR_BIT_FACTOR = 1.0 / 8.0
NEURON_OPS = {  # (multiplies, additions) per neuron per step
  "empf": (1, 2),
  "empf+mem_bn": (2, 3),
  "parallel": (0, 1),
  "lif": (1, 2),
}


@dataclasses.dataclass(frozen=True)
class SynapticLayer:
  """One convolution or FC layer.

  Attributes:
    name: module path, e.g. ``blocks.0.conv1``.
    kind: ``conv`` or ``dense``.
    source: ``spikes`` (sparse: only non-zero inputs count) or ``currents`` (every input counts).
    op: ``AC`` (binary/ternary weights) or ``MAC`` (float weights).
    input_rate: fraction of non-zero inputs.
    ops: operations per sample over all steps (SOPs when ``source == 'spikes'``).
  """

  name: str
  kind: str
  source: str
  op: str
  input_rate: float
  ops: float

  @property
  def energy_pj(self) -> float:
    return self.ops * (AC_ENERGY_PJ if self.op == "AC" else MAC_ENERGY_PJ)


@dataclasses.dataclass(frozen=True)
class NeuronLayer:
  """One neuron layer: ``kind`` is ``empf``, ``empf+mem_bn``, ``parallel`` or ``lif``.

  ``neurons`` counts one sample's neurons at one step; ``muls`` and ``adds`` are per sample over
  all steps.
  """

  name: str
  kind: str
  neurons: int
  firing_rate: float
  muls: float
  adds: float

  @property
  def energy_pj(self) -> float:
    return self.muls * MUL_ENERGY_PJ + self.adds * AC_ENERGY_PJ


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
  """One SECA gate: operations per sample over all steps."""

  name: str
  macs: float
  muls: float
  adds: float

  @property
  def energy_pj(self) -> float:
    return self.macs * MAC_ENERGY_PJ + self.muls * MUL_ENERGY_PJ + self.adds * AC_ENERGY_PJ


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-layer counts and totals, per sample over ``time_steps`` steps."""

  samples: int
  time_steps: int
  spike_bits: int | None
  synaptic: tuple[SynapticLayer, ...]
  neurons: tuple[NeuronLayer, ...]
  attention: tuple[AttentionLayer, ...]
  # The names of all the layers above in forward order (empf_jax.layout.walk).
  order: tuple[str, ...] = ()

  @property
  def sops(self) -> float:
    """Spike-driven synaptic operations."""
    return sum(layer.ops for layer in self.synaptic if layer.source == "spikes")

  @property
  def acs(self) -> float:
    return sum(layer.ops for layer in self.synaptic if layer.op == "AC")

  @property
  def macs(self) -> float:
    return sum(layer.ops for layer in self.synaptic if layer.op == "MAC")

  @property
  def neuron_ops(self) -> tuple[float, float]:
    """(multiplies, additions) of all neurons."""
    return (sum(layer.muls for layer in self.neurons), sum(layer.adds for layer in self.neurons))

  @property
  def firing_rate(self) -> float:
    """Non-zero fraction of all spikes of all neuron layers."""
    total = sum(layer.neurons for layer in self.neurons)
    return sum(layer.firing_rate * layer.neurons for layer in self.neurons) / max(total, 1)

  @property
  def energy_authors_pj(self) -> float:
    """SOPs x 0.9 pJ, divided by 8 with 4-bit spikes (the authors' convention)."""
    return authors_energy_pj(self.sops, self.spike_bits)

  @property
  def energy_full_pj(self) -> float:
    """Every synaptic operation at its price, plus neuron operations and SECA."""
    return (
      sum(layer.energy_pj for layer in self.synaptic)
      + sum(layer.energy_pj for layer in self.neurons)
      + sum(layer.energy_pj for layer in self.attention)
    )


def authors_energy_pj(sops: Any, spike_bits: int | None) -> Any:
  """The authors' energy: SOPs x 0.9 pJ, x 1/8 with 4-bit spikes."""
  return sops * AC_ENERGY_PJ * (FOUR_BIT_FACTOR if spike_bits == 4 else 1.0)


def recorded_run(model: SpikingNetwork, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs ``model(x)`` in evaluation mode with recording on and collects what the modules sow.

  The sown ``nnx.Intermediate`` values are captured with ``nnx.capture`` (so none stay on the
  model) and the ``record`` flags are switched off again afterwards.

  Returns:
    The logits [T, B, K] and a dict from module path (``blocks.0.conv1``) to the recorded array:
    a conv's or FC layer's input, a neuron's spikes, each time-major.
  """
  set_recording(model, True)
  try:
    logits, recorded = nnx.capture(lambda net, inputs: net(inputs, train=False), nnx.Intermediate)(
      model, x
    )
  finally:
    set_recording(model, False)
  return logits, {
    ".".join(map(str, path[:-1])): variable.get_value()[-1]
    for path, variable in nnx.to_flat_state(recorded)
  }


def nonzero_weights(conv: QConv) -> jax.Array:
  """1[W != 0] of the deployed kernel: all ones for binary and float, the ternary non-zeros."""
  kernel = conv.kernel[...]
  if conv.weights == "ternary":
    return (ternary_codes(kernel)[0] != 0).astype(jnp.float32)
  return jnp.ones(kernel.shape, jnp.float32)


def conv_synaptic_ops(
  inputs: jax.Array, weights_nonzero: jax.Array, stride: int, padding: int, *, sparse: bool = True
) -> jax.Array:
  """sum over steps, inputs and the outputs they reach of 1[x != 0] 1[W != 0] (see module doc).

  Args:
    inputs: time-major input [S, B, H, W, C_in].
    weights_nonzero: 1[W != 0], HWIO.
    stride: convolution stride.
    padding: zero padding (padded zeros are not inputs and never count).
    sparse: count only non-zero inputs (spike-fed layer); False counts every input.

  Returns:
    The total over the batch (a float32 scalar).
  """
  return jnp.sum(
    ops.fold_time(
      inputs,
      lambda x: conv_synaptic_ops_per_example(x, weights_nonzero, stride, padding, sparse=sparse),
    )
  )


def conv_synaptic_ops_per_example(
  inputs: jax.Array, weights_nonzero: jax.Array, stride: int, padding: int, *, sparse: bool = True
) -> jax.Array:
  """The operations of one step per example: inputs [B, H, W, C_in] -> [B].

  sum_{h, w, o} conv(1[x != 0], 1[W != 0])[h, w, o] = sum_{h, w} conv(1[x != 0], n)[h, w], with
  n[a, b, c] = sum_o 1[W[a, b, c, o] != 0]: the sum over output channels is taken on the kernel,
  so the count costs a convolution with one output channel.
  """
  mask = ((inputs != 0) if sparse else jnp.ones(inputs.shape, bool)).astype(jnp.float32)
  fanout = jnp.sum(weights_nonzero, axis=-1, keepdims=True)
  return jnp.sum(ops.conv2d(mask, fanout, stride, padding), axis=(1, 2, 3))


def dense_synaptic_ops(inputs: jax.Array, out_features: int, *, sparse: bool = True) -> jax.Array:
  """sum over steps and inputs of 1[x != 0] * out_features (every input when not sparse)."""
  return jnp.sum(dense_synaptic_ops_per_example(inputs, out_features, sparse=sparse))


def dense_synaptic_ops_per_example(
  inputs: jax.Array, out_features: int, *, sparse: bool = True
) -> jax.Array:
  """1[x != 0] * out_features summed over the last axis of inputs [..., F] -> [...]."""
  count = jnp.sum(inputs != 0, axis=-1) if sparse else jnp.full(inputs.shape[:-1], inputs.shape[-1])
  return count.astype(jnp.float32) * out_features


def _synapses(layout: Layout) -> list[Layer]:
  """Every conv/FC layer of a layout, in forward order."""
  return [layer for layer in walk(layout) if layer.kind in ("conv", "dense")]


def _op(layer: Layer) -> str:
  """AC for binary/ternary convolutions, MAC for float ones and FC layers."""
  return "AC" if layer.kind == "conv" and layer.spec.weights != "float" else "MAC"


def neuron_kind(spec: NeuronSpec) -> str:
  """The key of :data:`NEURON_OPS` for a neuron layer."""
  return "empf+mem_bn" if spec.mem_bn else spec.kind


def _conv_output_shape(conv: ConvSpec, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(H', W', C_out) of a convolution's output for input [..., H, W, C_in]."""

  def size(n: int) -> int:
    return (n + 2 * conv.padding - conv.kernel_size) // conv.stride + 1

  h, w = input_shape[-3:-1]
  return size(h), size(w), conv.out_features


def _batch_counts(model: SpikingNetwork, x: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """Per layer, additive counts over one batch (all steps): operations, non-zeros, sizes."""
  _, recorded = recorded_run(model, x)
  modules = modules_by_name(model)
  counts = {}
  for layer in walk(layout_of(model)):
    if layer.kind in ("conv", "dense"):
      inputs, module = recorded[layer.name], modules[layer.name]
      sparse = layer.reads == "spikes"
      if layer.kind == "conv":
        total = conv_synaptic_ops(
          inputs, nonzero_weights(module), module.stride, module.padding, sparse=sparse
        )
      else:
        total = dense_synaptic_ops(inputs, module.out_features, sparse=sparse)
      counts[layer.name] = {
        "ops": total,
        "nonzero": jnp.sum(inputs != 0).astype(jnp.float32),
        "size": jnp.asarray(inputs.size, jnp.float32),
      }
    elif layer.kind == "neuron":
      spikes = recorded[layer.name]
      counts[layer.name] = {
        "nonzero": jnp.sum(spikes != 0).astype(jnp.float32),
        "size": jnp.asarray(spikes.size, jnp.float32),
      }
    elif layer.kind == "seca":  # gates the output of the convolution layer.spec
      inputs = recorded[layer.spec.name]
      h, w, c = _conv_output_shape(layer.spec, inputs.shape)
      repeats = math.prod(inputs.shape[:2])
      counts[layer.name] = {
        "macs": jnp.asarray(SECA_TAPS * c * repeats, jnp.float32),
        "elements": jnp.asarray(h * w * c * repeats, jnp.float32),
      }
  return counts


@functools.partial(jax.jit, static_argnums=0)
def _jitted_counts(
  graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array
) -> dict[str, dict[str, jax.Array]]:
  return _batch_counts(nnx.merge(graphdef, state), x)


def measure(model: SpikingNetwork, batches: Iterable[jax.Array]) -> Report:
  """Runs the model in evaluation mode on every batch and accumulates the counts.

  Args:
    model: a network from :func:`empf_jax.models.create` (left unchanged).
    batches: time-major inputs [T, B, ...], all with the same number of steps T.

  Returns:
    The report, per sample, summed over the T steps.
  """
  graphdef, state = nnx.split(model)
  totals: dict[str, dict[str, float]] = {}
  samples, steps = 0, None
  for x in batches:
    x = jnp.asarray(x)
    if steps is not None and x.shape[0] != steps:
      raise ValueError(
        f"every batch must have the same number of time steps; got {x.shape[0]} after {steps}"
      )
    steps = x.shape[0]
    samples += x.shape[1]
    for name, values in jax.device_get(_jitted_counts(graphdef, state, x)).items():
      layer = totals.setdefault(name, {})
      for key, value in values.items():
        layer[key] = layer.get(key, 0.0) + float(value)
  if steps is None or samples == 0:
    raise ValueError("measure() needs at least one batch")
  return _report(model, totals, samples, steps)


def _report(
  model: SpikingNetwork, totals: dict[str, dict[str, float]], samples: int, steps: int
) -> Report:
  layers = walk(layout_of(model))
  synaptic = tuple(
    SynapticLayer(
      layer.name,
      layer.kind,
      cast(str, layer.reads),  # conv and dense layers always name what they read
      _op(layer),
      totals[layer.name]["nonzero"] / totals[layer.name]["size"],
      totals[layer.name]["ops"] / samples,
    )
    for layer in layers
    if layer.kind in ("conv", "dense")
  )
  neuron_layers, attention, spike_bits = [], [], None
  for layer in layers:
    counts = totals.get(layer.name, {})
    if layer.kind == "neuron":
      kind = neuron_kind(layer.spec)
      muls, adds = NEURON_OPS[kind]
      updates = counts["size"] / samples  # neuron updates per sample over all steps
      neuron_layers.append(
        NeuronLayer(
          layer.name,
          kind,
          round(updates / steps),
          counts["nonzero"] / counts["size"],
          muls * updates,
          adds * updates,
        )
      )
      spike_bits = layer.spec.spike_bits or spike_bits
    elif layer.kind == "seca":
      elements = counts["elements"] / samples
      attention.append(
        AttentionLayer(layer.name, macs=counts["macs"] / samples, muls=elements, adds=elements)
      )
  return Report(
    samples,
    steps,
    spike_bits,
    synaptic,
    tuple(neuron_layers),
    tuple(attention),
    tuple(layer.name for layer in layers if layer.name),
  )


def spike_bits_of(arch: deploy.Architecture) -> int | None:
  """The spike code of a deployed network's neurons (4 or None), for the authors' discount."""
  return next(
    (
      layer.spec.spike_bits
      for layer in walk(arch.layout)
      if layer.kind == "neuron" and layer.spec.spike_bits
    ),
    None,
  )


def step_operations(
  arch: deploy.Architecture, kernels: dict[str, jax.Array], record: deploy.StepRecord
) -> dict[str, jax.Array]:
  """The operations and energy of one step of a deployed network, per example.

  A probe for :func:`empf_jax.deploy.run` and :func:`empf_jax.deploy.run_early_exit`: the
  conventions of :func:`measure` (module docstring) applied to the layer inputs and membranes
  the deployed runner computed at this step, with 1[W != 0] from the unpacked kernels (ternary
  zeros skipped, every binary and float weight counted). For example b at step t::

      ops_l[b] = sum_{h, w, o} conv(1[x_l[b] != 0], 1[W_l != 0])   (conv layer l; FC: nnz x F_out)
      SOPs[b] = sum of ops_l[b] over the spike-fed layers (1[x != 0] -> 1 for the current-fed)
      energy_authors[b] = 0.9 pJ x SOPs[b]   (x 1/8 with 4-bit spikes)
      energy_full[b] = 0.9 pJ x (ACs[b] + neuron additions) + 4.6 pJ x MACs[b]
                       + 3.7 pJ x neuron multiplies + SECA

  Args:
    arch: the deployed network's architecture.
    kernels: its unpacked convolution kernels (+-1 signs, ternary codes or float).
    record: what the step computed (batch B).

  Returns:
    Per example [B] (float32): ``sops``, ``acs``, ``macs`` (synaptic), ``neuron_muls``,
    ``neuron_adds`` and the two energies ``energy_authors_pj`` and ``energy_full_pj`` (SECA
    included in the full one), the keys of the efficiency report's totals.
  """
  batch = record.logits.shape[0]
  zero = jnp.zeros(batch, jnp.float32)
  sops, acs, macs = zero, zero, zero
  for synapse in _synapses(arch.layout):
    spec, inputs = synapse.spec, record.inputs[synapse.name]
    sparse = synapse.reads == "spikes"
    if synapse.kind == "conv":
      nonzero = (
        kernels[spec.name] != 0 if spec.weights == "ternary" else jnp.ones(spec.kernel_shape, bool)
      ).astype(jnp.float32)
      count = conv_synaptic_ops_per_example(
        inputs, nonzero, spec.stride, spec.padding, sparse=sparse
      )
    else:
      count = dense_synaptic_ops_per_example(
        inputs.reshape(batch, -1), spec.out_features, sparse=sparse
      )
    if sparse:
      sops = sops + count
    if _op(synapse) == "AC":
      acs = acs + count
    else:
      macs = macs + count
  muls, adds, seca = zero, zero, 0.0
  for layer in walk(arch.layout):
    if layer.kind == "neuron":
      per_neuron = NEURON_OPS[neuron_kind(layer.spec)]
      neurons = math.prod(record.membranes[layer.name].shape[1:])
      muls, adds = muls + per_neuron[0] * neurons, adds + per_neuron[1] * neurons
    elif layer.kind == "seca":  # pooling additions, 5-tap MACs, gate multiplies
      inputs = record.inputs[layer.name]
      elements, channels = math.prod(inputs.shape[1:]), inputs.shape[-1]
      seca += elements * (AC_ENERGY_PJ + MUL_ENERGY_PJ) + SECA_TAPS * channels * MAC_ENERGY_PJ
  full = (
    acs * AC_ENERGY_PJ + macs * MAC_ENERGY_PJ + muls * MUL_ENERGY_PJ + adds * AC_ENERGY_PJ + seca
  )
  return {
    "sops": sops,
    "acs": acs,
    "macs": macs,
    "neuron_muls": muls,
    "neuron_adds": adds,
    "energy_authors_pj": authors_energy_pj(sops, spike_bits_of(arch)),
    "energy_full_pj": full,
  }


MICRO = 1e-6


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One row of the report; operations per sample over all steps, energies in pJ.

  Attributes:
    name: module path (``blocks.0.conv1``, ``unit2.neuron``).
    kind: ``conv``/``dense`` (synaptic), a neuron kind (``empf``, ``empf+mem_bn``, ``parallel``,
      ``lif``) or ``seca``.
    rate: neuron layers: fraction of non-zero spikes; synaptic layers: fraction of non-zero inputs;
      None for SECA.
    sops: spike-driven synaptic operations.
    acs: synaptic accumulates (binary or ternary weights).
    macs: synaptic multiply-accumulates (float weights), and SECA's 1-D convolution.
    nops: neuron operations (multiplies + additions); for SECA its pooling additions and gate
      multiplies.
    energy_authors_pj: SOPs x 0.9 pJ, x 1/8 with 4-bit spikes.
    energy_full_pj: every operation of the layer at its price.
  """

  name: str
  kind: str
  rate: float | None
  sops: float
  acs: float
  macs: float
  nops: float
  energy_authors_pj: float
  energy_full_pj: float


def layer_rows(report: Report) -> list[LayerRow]:
  """One :class:`LayerRow` per synaptic, neuron and SECA layer of ``report``, in forward order
  (``report.order``)."""
  rows = []
  for layer in report.synaptic:
    sops = layer.ops if layer.source == "spikes" else 0.0
    rows.append(
      LayerRow(
        layer.name,
        layer.kind,
        layer.input_rate,
        sops,
        acs=layer.ops if layer.op == "AC" else 0.0,
        macs=layer.ops if layer.op == "MAC" else 0.0,
        nops=0.0,
        energy_authors_pj=authors_energy_pj(sops, report.spike_bits),
        energy_full_pj=layer.energy_pj,
      )
    )
  for neuron in report.neurons:
    rows.append(
      LayerRow(
        neuron.name,
        neuron.kind,
        neuron.firing_rate,
        0.0,
        0.0,
        0.0,
        neuron.muls + neuron.adds,
        0.0,
        neuron.energy_pj,
      )
    )
  for gate in report.attention:
    rows.append(
      LayerRow(
        gate.name,
        "seca",
        None,
        0.0,
        0.0,
        gate.macs,
        gate.muls + gate.adds,
        0.0,
        gate.energy_pj,
      )
    )
  by_name = {row.name: row for row in rows}
  return [by_name[name] for name in report.order]


def format_value(value: float | None, scale: float = 1.0) -> str:
  """``value * scale`` to 4 significant digits for the report's tables; ``-`` for None."""
  return "-" if value is None else f"{value * scale:.4g}"


def to_markdown(report: Report, rows: list[LayerRow] | None = None) -> str:
  """The report as Markdown: one row per layer in forward order (``rows``, default
  :func:`layer_rows`), the totals, and what the columns count; operations in millions, energies
  in microjoules per example."""
  if rows is None:
    rows = layer_rows(report)
  four_bit = report.spike_bits == 4
  spikes = "4-bit" if four_bit else "floating-point"
  applied = (
    "applied here" if four_bit else "not applied here: this network fires floating-point spikes"
  )
  intro = (
    f"Per test example, summed over T = {report.time_steps} steps, averaged over "
    f"{report.samples} examples; {spikes} spikes."
  )
  header = (
    "| layer | kind | firing rate | SOPs (M) | ACs (M) | MACs (M) | NOPs (M) | "
    "energy, authors (uJ) | energy, full (uJ) |"
  )
  legend = (
    "Firing rate: the fraction of non-zero spikes of a neuron layer; for a convolution "
    "or FC layer, the fraction of its inputs that are non-zero. SOPs are the operations "
    "of layers fed by spikes; ACs + MACs count every synaptic operation. NOPs: neuron "
    "multiplies and additions (for a SECA row, its pooling additions and gate "
    "multiplies; the total counts neurons only)."
  )
  energy = (
    f"Energy at 45 nm: {AC_ENERGY_PJ} pJ per addition (AC), "
    f"{MAC_ENERGY_PJ} pJ per MAC. Authors' column: SOPs x "
    f"{AC_ENERGY_PJ} pJ only; with 4-bit spikes the additions are divided "
    f"by 8 (32-bit over 4-bit spike words), as the authors count them ({applied}). "
    "Full column: every synaptic operation at its AC or MAC price, plus the neuron and "
    "SECA operations, without the 4-bit discount."
  )
  lines = ["# Efficiency", "", intro, "", header, "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    cells = [row.name, row.kind, format_value(row.rate)] + [
      format_value(value, MICRO)
      for value in (
        row.sops,
        row.acs,
        row.macs,
        row.nops,
        row.energy_authors_pj,
        row.energy_full_pj,
      )
    ]
    lines.append("| " + " | ".join(cells) + " |")
  muls, adds = report.neuron_ops
  lines += [
    "",
    "| total | value |",
    "|---|---|",
    f"| SOPs (M) | {format_value(report.sops, MICRO)} |",
    f"| ACs (M) | {format_value(report.acs, MICRO)} |",
    f"| MACs (M) | {format_value(report.macs, MICRO)} |",
    f"| NOPs (M) | {format_value(muls + adds, MICRO)} |",
    f"| firing rate (all neurons) | {format_value(report.firing_rate)} |",
    f"| energy, authors (uJ) | {format_value(report.energy_authors_pj, MICRO)} |",
    f"| energy, full (uJ) | {format_value(report.energy_full_pj, MICRO)} |",
    "",
    legend,
    "",
    energy,
  ]
  return "\n".join(lines) + "\n"
