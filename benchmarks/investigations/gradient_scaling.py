"""How the online gradient of each membrane relates to the BPTT gradient (docs/model.md §1).

    python -m benchmarks.investigations.gradient_scaling \
        [--out=benchmarks/results/gradient_scaling.json]
        (the verdict also goes to the same path with .txt)
        [--batch=64] [--inputs=32] [--neurons=128] [--classes=10] [--time_steps=4] [--seed=0]

One EM-PF layer of N neurons fed by a dense layer, with a linear read-out at every step:

    I_t = x_t W,   m_t = lambda_t sg(u_{t-1}) + I_t + e_t,   s_t = relu(m_t - theta_t),
    u_t = m_t - s_t,   f_t = s_t V + c.

The offsets e_t are zero; ``delta_t = dL/de_t`` is the gradient of the loss with respect to the
membrane m_t, computed once with the online cut (``online=True``) and once without (BPTT), for
the same parameters, input and loss. Two losses are used: ``per_step`` L = sum_t CE(f_t) (the
online rule's losses; with the cut, dL/dm_t is exactly the gradient that online step t uses)
and ``summed`` L = CE(sum_t f_t) (the BPTT rule's loss).

What the maths guarantees for EM-PF, with H_t = 1[m_t > theta_t] and g_t = V (dL/df_t) the
direct term (ds_t/dm_t = H_t and du_t/dm_t = 1 - H_t, because u_t = min(m_t, theta_t)):

    delta^online_t = H_t g_t
    delta^BPTT_t   = H_t g_t + lambda_{t+1} (1 - H_t) delta^BPTT_{t+1},   delta^BPTT_{T+1} = 0.

So the two agree exactly where a neuron fires and at t = T; where a neuron is silent the online
gradient is 0 while the BPTT gradient carries the (decayed) gradient of the neuron's next firing
step. The BPTT gradient is therefore a per-step rescaling of the online one (delta^BPTT_t = k_t
delta^online_t for one scalar k_t per step) exactly when no silent neuron fires later with a
non-zero direct term, and then k_t = 1. The script measures, per step, the least-squares k_t, the
relative residual ||delta^BPTT_t - k_t delta^online_t|| / ||delta^BPTT_t|| (0 for a pure
rescaling), the share of entries that BPTT updates and online training does not, and the cosine
of the two weight gradients dL/dW, in scenarios that vary the drive and the decay, plus the LIF
neuron for contrast (its surrogate and soft reset mix both terms).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from empf_jax import neurons, training

LOSSES = ("per_step", "summed")
NEURONS = ("empf", "lif")


class Problem(NamedTuple):
  """One layer's inputs and parameters.

  Attributes:
    x: input per step [T, B, D] (the same at every step for direct encoding).
    w: input weights [D, N].
    v: read-out weights [N, K].
    c: read-out bias [K].
    params: per-step decay and threshold logits, each [T].
    labels: int labels [B].
  """

  x: jax.Array
  w: jax.Array
  v: jax.Array
  c: jax.Array
  params: neurons.EMPFParams
  labels: jax.Array


class Scenario(NamedTuple):
  """Settings of one measured case (see :data:`SCENARIOS`)."""

  name: str
  neuron: str = "empf"
  drive: float = 1.0
  bias: float = 0.0
  decay_logit: float | None = None
  static: bool = True


SCENARIOS = (
  Scenario("mixed firing (random decay/threshold logits, static input)"),
  Scenario("mixed firing, a new input at every step", static=False),
  Scenario("every neuron fires (strong positive drive)", drive=0.05, bias=3.0),
  Scenario("weak decay (lambda = sigma(-6) = 0.0025)", decay_logit=-6.0),
  Scenario("strong decay (lambda = sigma(4) = 0.98)", decay_logit=4.0),
  Scenario("LIF neuron (soft reset, triangle surrogate)", neuron="lif"),
)


def make_problem(
  key: jax.Array,
  scenario: Scenario,
  *,
  batch: int,
  inputs: int,
  neurons_: int,
  classes: int,
  time_steps: int,
) -> Problem:
  """Random inputs and weights; W is scaled so that roughly half the EM-PF neurons fire.

  ``drive`` multiplies W and ``bias`` is added to every input current (through a constant input
  feature), which moves the firing rate; ``decay_logit`` fixes every a_t.
  """
  kx, kw, kv, ka, kb, ky = jax.random.split(key, 6)
  shape = (batch, inputs) if scenario.static else (time_steps, batch, inputs)
  x = jax.random.normal(kx, shape)
  if scenario.static:
    x = jnp.broadcast_to(x, (time_steps, batch, inputs))
  w = scenario.drive * jax.random.normal(kw, (inputs, neurons_)) / np.sqrt(inputs)
  x = jnp.concatenate([x, jnp.ones((time_steps, batch, 1))], axis=-1)
  w = jnp.concatenate([w, jnp.full((1, neurons_), scenario.bias)], axis=0)
  v = jax.random.normal(kv, (neurons_, classes)) / np.sqrt(neurons_)
  a = jax.random.normal(ka, (time_steps,))
  if scenario.decay_logit is not None:
    a = jnp.full((time_steps,), scenario.decay_logit)
  b = jax.random.normal(kb, (time_steps,))
  labels = jax.random.randint(ky, (batch,), 0, classes)
  return Problem(x, w, v, jnp.zeros((classes,)), neurons.EMPFParams(a, b), labels)


def forward(
  problem: Problem, w: jax.Array, offsets: jax.Array, *, online: bool, neuron: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Logits [T, B, K], membranes m_t [T, B, N] and the indicator H_t [T, B, N] of the one-layer
  network; H_t = ds_t/dm_t for EM-PF (relu' = 1[m_t > theta_t]), 1[m_t >= theta'_t] for LIF."""
  if neuron not in NEURONS:
    raise ValueError(f"neuron={neuron!r} is not allowed; allowed: {', '.join(NEURONS)}")

  def step(state, current, t):
    membrane = neurons.empf_integrate(problem.params, state, current, t, online=online)
    membrane = membrane + offsets[t]
    if neuron == "lif":
      threshold = jax.nn.sigmoid(problem.params.b[t]) + neurons.LIF_THRESHOLD_OFFSET
      spike = threshold * neurons.heaviside_triangle(membrane - threshold)
      return neurons.MembraneState(membrane - spike), (spike, membrane, membrane >= threshold)
    state, spike = neurons.empf_fire(problem.params, membrane, t)
    return state, (spike, membrane, spike > 0)

  currents = problem.x @ w
  zero = neurons.MembraneState(jnp.zeros(currents.shape[1:]))
  _, (spikes, membranes, fires) = neurons.run_steps(step, zero, currents)
  return spikes @ problem.v + problem.c, membranes, fires


def loss_value(logits: jax.Array, labels: jax.Array, loss: str) -> jax.Array:
  """``per_step``: sum_t CE_ls(f_t, y); ``summed``: CE_ls(sum_t f_t, y) (label smoothing 0.1)."""
  targets = training.smoothed_targets(labels, logits.shape[-1])
  if loss == "per_step":
    return sum(training.cross_entropy(f, targets) for f in logits)
  if loss == "summed":
    return training.cross_entropy(jnp.sum(logits, axis=0), targets)
  raise ValueError(f"loss={loss!r} is not allowed; allowed: {', '.join(LOSSES)}")


@functools.partial(jax.jit, static_argnames=("online", "loss", "neuron"))
def gradients(
  problem: Problem, *, online: bool, loss: str, neuron: str = "empf"
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dL/dm [T, B, N], dL/dW [D+1, N], H [T, B, N]) with or without the online cut."""

  def objective(offsets, w):
    logits, _, fires = forward(problem, w, offsets, online=online, neuron=neuron)
    return loss_value(logits, problem.labels, loss), fires

  offsets = jnp.zeros(problem.x.shape[:2] + (problem.w.shape[1],))
  (d_membrane, d_w), fires = jax.grad(objective, argnums=(0, 1), has_aux=True)(offsets, problem.w)
  return d_membrane, d_w, fires


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
  return float(np.vdot(a, b)) / denominator if denominator > 0 else float("nan")


def compare(problem: Problem, *, loss: str, neuron: str = "empf") -> dict:
  """Per-step statistics of delta^online_t against delta^BPTT_t, and the weight gradients."""
  online, w_online, fires = map(
    np.asarray, gradients(problem, online=True, loss=loss, neuron=neuron)
  )
  bptt, w_bptt, _ = map(np.asarray, gradients(problem, online=False, loss=loss, neuron=neuron))
  steps = []
  for t in range(online.shape[0]):
    on, bp, h = online[t].astype(np.float64), bptt[t].astype(np.float64), fires[t]
    on_sq = float(np.vdot(on, on))
    scale = float(np.vdot(bp, on)) / on_sq if on_sq > 0 else None
    bp_norm = float(np.linalg.norm(bp))
    residual = float(np.linalg.norm(bp - (scale or 0.0) * on))
    both = (on != 0) & (bp != 0)
    ratios = bp[both] / on[both]
    steps.append(
      {
        "step": t + 1,
        "firing_fraction": float(np.mean(h)),
        "least_squares_scale": scale,
        "relative_residual": residual / bp_norm if bp_norm > 0 else 0.0,
        "cosine": _cosine(on, bp),
        "norm_ratio_bptt_over_online": bp_norm / np.sqrt(on_sq) if on_sq > 0 else None,
        "elementwise_ratio_min": float(ratios.min()) if ratios.size else None,
        "elementwise_ratio_max": float(ratios.max()) if ratios.size else None,
        "share_bptt_only": float(np.mean((bp != 0) & (on == 0))),
        "max_abs_difference_where_firing": float(np.max(np.where(h, np.abs(on - bp), 0.0))),
      }
    )
  return {
    "loss": loss,
    "neuron": neuron,
    "steps": steps,
    "weight_gradient_cosine": _cosine(w_online, w_bptt),
    "weight_gradient_norm_ratio_bptt_over_online": float(
      np.linalg.norm(w_bptt) / np.linalg.norm(w_online)
    ),
  }


def pure_rescaling(result: dict, tolerance: float = 1e-6) -> list[bool]:
  """Per step: is delta^BPTT_t = k_t delta^online_t for one scalar k_t (relative residual)?"""
  return [s["relative_residual"] <= tolerance for s in result["steps"]]


def verdict(results: list[dict], tolerance: float = 1e-6) -> str:
  """A short text summary of the measured cases."""
  lines = []
  for r in results:
    pure = pure_rescaling(r, tolerance)
    steps = ", ".join(
      f"t={s['step']}: k={s['least_squares_scale']:.3g} "
      f"res={s['relative_residual']:.2g} fire={s['firing_fraction']:.2f}"
      if s["least_squares_scale"] is not None
      else f"t={s['step']}: online gradient 0"
      for s in r["steps"]
    )
    lines.append(
      f"- {r['scenario']} [{r['loss']} loss]: pure per-step rescaling at "
      f"{sum(pure)}/{len(pure)} steps; weight-gradient cosine "
      f"{r['weight_gradient_cosine']:.3f}. {steps}"
    )
  empf = [r for r in results if r["neuron"] == "empf"]
  exact = all(s["max_abs_difference_where_firing"] <= tolerance for r in empf for s in r["steps"])
  last = all(pure_rescaling(r, tolerance)[-1] for r in empf)
  holds = sorted({r["scenario"] for r in empf if all(pure_rescaling(r, tolerance))})
  fails = sorted({r["scenario"] for r in empf if not all(pure_rescaling(r, tolerance))})
  worst = {
    name: max(s["relative_residual"] for r in empf if r["scenario"] == name for s in r["steps"])
    for name in fails
  }
  lines.append(
    "Verdict (EM-PF): delta^online_t = H_t g_t and delta^BPTT_t = H_t g_t + lambda_{t+1} "
    "(1 - H_t) delta^BPTT_{t+1}, so the two agree where the neuron fires (measured: "
    f"{'equal' if exact else 'NOT equal'} to {tolerance:g} in every case) and at t = T "
    f"({'equal' if last else 'NOT equal'}); a pure per-step rescaling (k_t = 1) needs every "
    "silent neuron to stay without gradient from later steps. It held at every step in: "
    + ("; ".join(holds) if holds else "none")
    + ". It failed in: "
    + (
      "; ".join(f"{name} (largest relative residual {worst[name]:.2g})" for name in fails)
      if fails
      else "none"
    )
    + "."
  )
  return "\n".join(lines)


def run(
  *,
  batch: int,
  inputs: int,
  neurons_: int,
  classes: int,
  time_steps: int,
  seed: int,
  scenarios: tuple[Scenario, ...] = SCENARIOS,
) -> dict:
  """Measures every scenario with both losses; returns the JSON-ready record."""
  results = []
  for i, scenario in enumerate(scenarios):
    problem = make_problem(
      jax.random.fold_in(jax.random.key(seed), i),
      scenario,
      batch=batch,
      inputs=inputs,
      neurons_=neurons_,
      classes=classes,
      time_steps=time_steps,
    )
    for loss in LOSSES:
      record = compare(problem, loss=loss, neuron=scenario.neuron)
      record["scenario"] = scenario.name
      results.append(record)
  return {
    "meta": {
      "batch": batch,
      "inputs": inputs,
      "neurons": neurons_,
      "classes": classes,
      "time_steps": time_steps,
      "seed": seed,
      "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    },
    "results": results,
    "verdict": verdict(results),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="benchmarks/results/gradient_scaling.json")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--inputs", type=int, default=32)
  parser.add_argument("--neurons", type=int, default=128)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--time_steps", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  record = run(
    batch=args.batch,
    inputs=args.inputs,
    neurons_=args.neurons,
    classes=args.classes,
    time_steps=args.time_steps,
    seed=args.seed,
  )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
      f.write(record["verdict"] + "\n")
  print(record["verdict"])
  return record


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
