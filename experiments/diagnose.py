"""Where a training step first produced a NaN or Inf: which time step, which layer.

The training step is one fused XLA computation (a scan over all time steps, gradients and updates
included), so a non-finite loss or parameter at its end says nothing about where the fault arose.
:func:`first_nonfinite` replays one batch of the step's training rule (docs/model.md §4) time step
by time step, as separate computations (forward and gradient of one step, then the update) whose
layer values are all returned, the layers' ``record`` hooks on; it then checks every value in
the order the training step computes it. For each time step t that the rule computes:

1. the recorded layer values (convolution and dense inputs, neuron spikes), in forward order;
2. the logits f_t(x), then the loss;
3. the gradient of each parameter, in backward order (the layer nearest the output first);
4. each parameter after the optimizer update w <- w - lr * SGD(g + wd * w), in forward order;
5. the BatchNorm running statistics, in forward order.

Random single-step training checks 1 and 5 for the gradient-free steps t < t*, then all five at
t*. BPTT runs all T steps in one forward pass: the first non-finite time step is the first one
with a non-finite recorded value, and the gradient and update belong to the whole sequence.

Forward order is read from the jaxpr of the step: a value's position is the index of the equation
that computes it, a parameter's the index of the first equation that reads it.

The replay's computations are compiled separately from the fused step and may round differently;
so a fault at the edge of the float range can vanish in the replay, and :func:`first_nonfinite`
then returns None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.extend import core as jax_core

from empf_jax import training


class Fault(NamedTuple):
  """The first non-finite value of a replayed training step.

  Attributes:
    time_step: 1-based time step, or None where the value covers all steps (BPTT's loss,
      gradients and update).
    where: the value, e.g. ``unit2/neuron spikes``, ``loss``, ``gradient of fc/kernel``,
      ``fc/kernel after the update``.
    kind: ``NaN``, ``+Inf`` or ``-Inf`` (the first of these that the value holds).
  """

  time_step: int | None
  where: str
  kind: str

  def describe(self, time_steps: int) -> str:
    when = (
      f"time step {self.time_step} of {time_steps}"
      if self.time_step is not None
      else f"all {time_steps} time steps (BPTT)"
    )
    return f"{when}: {self.kind} first in {self.where}"


@jax.jit
def _nonfinite_flags(value: jax.Array) -> jax.Array:
  return jnp.stack(
    [jnp.any(jnp.isnan(value)), jnp.any(value == jnp.inf), jnp.any(value == -jnp.inf)]
  )


def nonfinite_kind(value: jax.Array) -> str | None:
  """``NaN``, ``+Inf`` or ``-Inf`` if ``value`` holds one (checked in that order), else None."""
  if not jnp.issubdtype(jnp.result_type(value), jnp.inexact):
    return None
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    flags = np.asarray(_nonfinite_flags(value))  # a replicated scalar on every process
  else:
    host = np.asarray(value)  # NumPy: no compilation per shape
    flags = (np.isnan(host).any(), (host == np.inf).any(), (host == -np.inf).any())
  for flag, kind in zip(flags, ("NaN", "+Inf", "-Inf")):
    if flag:
      return kind
  return None


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def _recorded_values(recorded: nnx.State) -> list[tuple[str, jax.Array]]:
  """(``layer name``, value) of every recorded value, in the flat state's order."""
  return [
    (f"{_path(path[:-1])} {path[-1]}", value)
    for path, variable in nnx.to_flat_state(recorded)
    for value in variable.get_value()
  ]


def _equation_order(fn: Callable, *args) -> tuple[list[int], list[int]]:
  """Positions in the jaxpr of ``fn(*args)``: for each flat output the index of the equation
  computing it, for each flat input the index of the first equation reading it (-1 for an
  output that is an input, len(eqns) for an input that is never read)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  produced, first_read = {}, {}
  for index, equation in enumerate(jaxpr.eqns):
    for var in equation.outvars:
      produced[var] = index
    for var in equation.invars:
      if isinstance(var, jax_core.Var):
        first_read.setdefault(var, index)
  outputs = [produced.get(v, -1) if isinstance(v, jax_core.Var) else -1 for v in jaxpr.outvars]
  return outputs, [first_read.get(v, len(jaxpr.eqns)) for v in jaxpr.invars]


def _first(
  named: list[tuple[str, jax.Array]], order: Callable[[], list[int]]
) -> tuple[str, str] | None:
  """(name, kind) of the first non-finite value of ``named``: least position in ``order()``
  (called only if some value is non-finite), ties broken by name."""
  bad = [
    (i, kind) for i, (_, value) in enumerate(named) if (kind := nonfinite_kind(value)) is not None
  ]
  if not bad:
    return None
  positions = order()
  index, kind = min(bad, key=lambda item: (positions[item[0]], named[item[0]][0]))
  return named[index][0], kind


def _leaves(state: Any) -> list[tuple[tuple, jax.Array]]:
  """(path, array) of every leaf of a state, in ``jax.tree`` order (the order of jaxpr inputs)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return [
    (
      tuple(
        getattr(k, "key", getattr(k, "idx", None))
        for k in keypath
        if not isinstance(k, jax.tree_util.GetAttrKey)
      ),
      leaf,
    )
    for keypath, leaf in flat
  ]


def _flat(state: Any, suffix: str = "", prefix: str = "") -> list[tuple[str, jax.Array]]:
  """(``prefix path suffix``, value) of every leaf of a state."""
  return [(f"{prefix}{_path(path)}{suffix}", value) for path, value in _leaves(state)]


class _Replay:
  """The instrumented pieces of the training rules for one model and optimizer, compiled once:
  forward steps with recording, their gradients, the update; and forward orders."""

  def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    self.graphdef = graphdef
    self.optimizer = optimizer
    self.forward = jax.jit(self.step)
    self.gradient = jax.jit(jax.value_and_grad(self.step, has_aux=True))
    self.sequence_gradient = jax.jit(jax.value_and_grad(self.sequence, has_aux=True))
    self.apply_update = jax.jit(self.update)

  def _model(self, params: Any, rest: Any) -> nnx.Module:
    model = training.fresh_merge(self.graphdef, params, rest)
    training.set_recording(model, True)
    return model

  def step(self, params, rest, neuron_state, x_t, t, targets):
    """One online time step: (loss_t, (logits_t, recorded, rest, neuron_state))."""
    model = self._model(params, rest)
    (logits, neuron_state), recorded = nnx.capture(
      lambda net: net.step(x_t, neuron_state, t, train=True), nnx.Intermediate
    )(model)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    return training.cross_entropy(logits, targets), (logits, recorded, rest, neuron_state)

  def sequence(self, params, rest, x_seq, targets):
    """All steps with gradients through time: (CE(sum_t f_t), (logits [T, ...], recorded, rest))."""
    model = self._model(params, rest)
    logits, recorded = nnx.capture(
      lambda net: net(x_seq, train=True, online=False), nnx.Intermediate
    )(model)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    return training.sequence_loss(logits, targets), (logits, recorded, rest)

  def update(self, params, opt_state, grads):
    return training.apply_update(self.optimizer, params, opt_state, grads)

  @staticmethod
  def order(
    forward: Callable, params: Any, rest: Any, *args
  ) -> tuple[Callable[[], list[int]], Callable[[], dict]]:
    """Lazy forward positions: of the recorded values of ``forward(params, rest, *args)``, and of
    the leaves of (params, rest) as {("params" | "rest", *path): position}. Traced only when
    asked for, i.e. once a non-finite value has been found."""
    cache = {}

    def trace():
      if not cache:

        def recorded_only(params, rest, *args):
          return [value for _, value in _recorded_values(forward(params, rest, *args)[1][1])]

        outputs, inputs = _equation_order(recorded_only, params, rest, *args)
        leaves = [("params",) + path for path, _ in _leaves(params)] + [
          ("rest",) + path for path, _ in _leaves(rest)
        ]
        cache.update(outputs=outputs, inputs=dict(zip(leaves, inputs)))
      return cache

    return lambda: trace()["outputs"], lambda: trace()["inputs"]


@functools.lru_cache(maxsize=4)
def _replay(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> _Replay:
  return _Replay(graphdef, optimizer)


def _leaf_order(
  state: Any, group: str, leaves: Callable[[], dict], sign: int = 1
) -> Callable[[], list[int]]:
  return lambda: [sign * leaves()[(group,) + path] for path, _ in _leaves(state)]


def _check_update(
  time_step: int | None,
  loss: jax.Array,
  logits: jax.Array,
  grads: Any,
  params: Any,
  leaves: Callable[[], dict],
) -> Fault | None:
  """Checks 2-4 of the module docstring: logits, loss, gradients, updated parameters."""
  for name, value in (("logits", logits), ("loss", loss)):
    kind = nonfinite_kind(value)
    if kind is not None:
      return Fault(time_step, name, kind)
  found = _first(_flat(grads, prefix="gradient of "), _leaf_order(grads, "params", leaves, -1))
  if found is None:
    found = _first(_flat(params, suffix=" after the update"), _leaf_order(params, "params", leaves))
  return None if found is None else Fault(time_step, *found)


def _check_statistics(time_step: int | None, rest: Any, leaves: Callable[[], dict]) -> Fault | None:
  """Check 5 of the module docstring: BatchNorm running statistics."""
  found = _first(_flat(rest, suffix=" (running statistics)"), _leaf_order(rest, "rest", leaves))
  return None if found is None else Fault(time_step, *found)


def first_nonfinite(
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  config: training.StepConfig,
  state: training.TrainState,
  x: jax.Array,
  labels: jax.Array,
  learning_rate: float,
  seed_key: jax.Array,
) -> Fault | None:
  """Replays one training batch time step by time step and returns its first non-finite value.

  Args:
    graphdef: the model's static graph (from :func:`empf_jax.training.create_train_state`).
    optimizer: the optimizer the run trains with.
    config: the run's step settings.
    state: the train state before the batch (finite).
    x: the batch's input, [B, H, W, C] or [B, T, ...] as the training step takes it.
    labels: int [B].
    learning_rate: the batch's learning rate.
    seed_key: the run's key (random-step draw, mixing).

  Returns:
    The first non-finite value in the order of the module docstring, or None if the replay
    stays finite.
  """
  x_seq, targets = training.prepare_batch(config, x, labels, state.step, seed_key)
  replay = _replay(graphdef, optimizer)
  params, rest = state.params, state.rest
  opt_state = training.set_learning_rate(state.opt_state, learning_rate)

  if config.mode == "bptt":
    recorded_order, leaves = replay.order(replay.sequence, params, rest, x_seq, targets)
    (loss, (logits, recorded, new_rest)), grads = replay.sequence_gradient(
      params, rest, x_seq, targets
    )
    named = _recorded_values(recorded)
    for t in range(config.time_steps):
      found = _first([(name, value[t]) for name, value in named], recorded_order)
      if found is not None:
        return Fault(t + 1, *found)
    params, _ = replay.apply_update(params, opt_state, grads)
    return _check_update(None, loss, logits, grads, params, leaves) or _check_statistics(
      None, new_rest, leaves
    )

  neuron_state = training.merge(graphdef, state).init_state(x_seq[0])
  run, updated = training.step_schedule(config.mode, config.time_steps, state.step, seed_key)
  trained = {int(t) for t in updated}
  for t in range(int(run)):
    args = (neuron_state, x_seq[t], jnp.int32(t), targets)
    recorded_order, leaves = replay.order(replay.step, params, rest, *args)
    if t in trained:
      (loss, (logits, recorded, new_rest, neuron_state)), grads = replay.gradient(
        params, rest, *args
      )
    else:
      loss, (logits, recorded, new_rest, neuron_state) = replay.forward(params, rest, *args)
    found = _first(_recorded_values(recorded), recorded_order)
    if found is not None:
      return Fault(t + 1, *found)
    if t in trained:
      params, opt_state = replay.apply_update(params, opt_state, grads)
      fault = _check_update(t + 1, loss, logits, grads, params, leaves)
      if fault is not None:
        return fault
    fault = _check_statistics(t + 1, new_rest, leaves)
    if fault is not None:
      return fault
    rest = new_rest
  return None
