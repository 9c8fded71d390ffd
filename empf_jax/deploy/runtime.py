"""Running a deployed network: all steps (:func:`run`) or until an exit rule fires
(:func:`run_early_exit`), docs/model.md §4, §5.

:func:`run` is an inference implementation of its own that reads only the deployed arrays; it
shares no forward code with the training modules, so its agreement with the trained network in
evaluation mode checks every fold of :mod:`empf_jax.deploy.fold`. Its layers are those of
:func:`empf_jax.layout.walk`, executed on named registers.

Anytime inference (:func:`run_early_exit`): each example stops at the first step t at which an
:class:`ExitRule` fires on its cumulative output c_t = sum_{tau <= t} f_tau, with the input's
length as the ceiling; its prediction is argmax c_t at that step, the prediction of the all-steps
evaluation at t (docs/model.md §4).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from empf_jax import neurons, ops
from empf_jax.deploy.fold import unpack_binary, unpack_ternary
from empf_jax.deploy.schema import Architecture, Deployed, Params
from empf_jax.layout import ConvSpec, DenseSpec, NeuronSpec, walk
from empf_jax.quantize import quantize_spike


def unpack_kernels(arch: Architecture, params: Params) -> dict[str, jax.Array]:
  """Every convolution kernel, HWIO, unpacked once per run: +-1 signs, ternary codes or float."""
  out = {}
  for layer in walk(arch.layout):
    if layer.kind != "conv":
      continue
    spec = layer.spec
    if spec.weights == "binary":
      out[spec.name] = unpack_binary(params[f"{spec.name}.bits"], spec.kernel_shape)
    elif spec.weights == "ternary":
      out[spec.name] = unpack_ternary(params[f"{spec.name}.bits"], spec.kernel_shape)
    else:
      out[spec.name] = jnp.asarray(params[f"{spec.name}.kernel"])
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

  def __init__(
    self,
    arch: Architecture,
    params: Params,
    kernels: dict[str, jax.Array],
    state: dict[str, jax.Array] | None,
    t: jax.Array,
    quantize_spikes: bool,
  ):
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
      scale, bias = None if scale is None else scale[self.t], bias[self.t]
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
    taps = jnp.asarray(self.params[f"{name}.kernel"])
    half = taps.shape[0] // 2
    mixed = jax.lax.conv_general_dilated(
      pooled, taps[:, None, None], (1,), ((half, half),), dimension_numbers=("NWC", "WIO", "NWC")
    )[..., 0]
    return x * jax.nn.sigmoid(mixed + self.params[f"{name}.bias"])[:, None, None, :]

  def neuron(self, spec: NeuronSpec, current: jax.Array) -> jax.Array:
    """One neuron step from the folded parameters (see :mod:`empf_jax.deploy.fold`)."""
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

  def __call__(self, x: jax.Array) -> jax.Array:
    """The step's logits: every layer of the walk in order, on named registers."""
    registers = {"x": x}
    for layer in walk(self.arch.layout):
      h = registers[layer.source]
      if layer.kind == "conv":
        h = self.conv(layer.spec, h)
      elif layer.kind == "dense":
        h = self.dense(layer.spec, h)
      elif layer.kind == "neuron":
        h = self.neuron(layer.spec, h)
      elif layer.kind == "seca":
        h = self.seca(layer.name, h if layer.other is None else h + registers[layer.other])
      elif layer.kind == "add":
        assert layer.other is not None  # an add names its other summand
        h = h + registers[layer.other]
      else:
        h = _RESHAPES[layer.kind](h)
      registers[layer.target] = h
    return registers["logits"]


# The parameter-free steps of a walk, on one step's [B, H, W, C] maps or [B, F] vectors.
_RESHAPES = {
  "max_pool": ops.max_pool,
  "avg_pool": lambda h: ops.avg_pool(h, 2),
  "mean": lambda h: ops.spatial_mean(h) if h.ndim > 2 else h,
  "flatten": lambda h: h.reshape(h.shape[0], -1),
  "to_map": lambda h: h.reshape(h.shape[0], 1, 1, -1),
}


def _step(
  arch: Architecture,
  params: Params,
  kernels: dict[str, jax.Array],
  state: dict[str, jax.Array] | None,
  x_t: jax.Array,
  t: jax.Array,
  quantize_spikes: bool,
) -> tuple[StepRecord, dict[str, jax.Array]]:
  runner = _Runner(arch, params, kernels, state, t, quantize_spikes)
  logits = runner(x_t)
  return StepRecord(logits, runner.membranes, runner.inputs), runner.new_state


def _prepare(
  deployed: Deployed, x: jax.Array, quantize_spikes: bool
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], StepRecord]:
  """(float32 input, unpacked kernels, zero state, the shapes of one step's record)."""
  arch, params = deployed.arch, deployed.params
  if x.shape[0] > arch.time_steps:
    raise ValueError(f"input has {x.shape[0]} time steps; this network has T={arch.time_steps}")
  x = x.astype(jnp.float32)
  kernels = unpack_kernels(arch, params)
  record, state = jax.eval_shape(
    lambda: _step(arch, params, kernels, None, x[0], jnp.int32(0), quantize_spikes)
  )
  return x, kernels, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state), record


@functools.partial(jax.jit, static_argnames=("quantize_spikes", "return_membranes", "probe"))
def run(
  deployed: Deployed,
  x: jax.Array,
  *,
  quantize_spikes: bool = True,
  return_membranes: bool = False,
  probe: Probe | None = None,
) -> Any:
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

  _, (logits, membranes, probed) = jax.lax.scan(
    body, state0, (x, jnp.arange(x.shape[0])), unroll=neurons.default_unroll()
  )
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
      raise ValueError(
        f"exit rule {text!r} is not RULE:THRESHOLD with RULE one of "
        f"{', '.join(EXIT_RULES)} (e.g. softmax:0.9, margin:2)"
      )
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
    # Top-2 as two maxima (the first top-1 position masked out), which equal lax.top_k's, ties
    # included: XLA partitions reductions over K per example, while its TopK gathers a batch
    # split over devices onto each of them.
    top1 = jnp.max(mean, axis=-1)
    first = jnp.argmax(mean, axis=-1)
    rest = jnp.where(jnp.arange(mean.shape[-1]) == first[..., None], -jnp.inf, mean)
    return top1 - jnp.max(rest, axis=-1) >= self.threshold


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
def run_early_exit(
  deployed: Deployed,
  x: jax.Array,
  rule: ExitRule | None,
  *,
  quantize_spikes: bool = True,
  probe: Probe | None = None,
) -> EarlyExit:
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
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  totals0 = (
    None
    if probe is None
    else zeros(jax.eval_shape(lambda k, r: probe(arch, k, r), kernels, record))
  )

  def body(carry):
    t, state, cumulative, done, steps, totals = carry
    record, state = _step(arch, params, kernels, state, x[t], t, quantize_spikes)
    running = ~done
    cumulative = jnp.where(running[:, None], cumulative + record.logits, cumulative)
    if probe is not None:
      totals = jax.tree.map(
        lambda total, value: (
          total + jnp.where(running.reshape((batch,) + (1,) * (value.ndim - 1)), value, 0)
        ),
        totals,
        probe(arch, kernels, record),
      )
    steps = jnp.where(running, t + 1, steps)
    done = done | (t + 1 == last)
    if rule is not None:
      done = done | rule.fires(cumulative, t + 1)
    return t + 1, state, cumulative, done, steps, totals

  carry = (
    jnp.int32(0),
    state0,
    zeros(record.logits),
    jnp.zeros(batch, bool),
    jnp.zeros(batch, jnp.int32),
    totals0,
  )
  _, _, cumulative, _, steps, totals = jax.lax.while_loop(
    lambda carry: ~jnp.all(carry[3]), body, carry
  )
  return EarlyExit(jnp.argmax(cumulative, axis=-1), steps, cumulative, totals)
