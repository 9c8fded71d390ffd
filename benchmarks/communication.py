"""What data-parallel training communicates per batch, read from the compiled train step, and the
step time and scaling efficiency that predicts at 8, 64 and 256 accelerators.

    python -m benchmarks.communication [--out=benchmarks/results/communication.json]
        [--cases=resnet18_cifar10_binary,resnet18_cifar10_ternary,resnet34_imagenet_ternary]
        [--modes=online,random_step,bptt] [--devices=8] [--mfu=0.35] [--smoke]

For each case (a shipped config, its network and weights) and training rule, the script compiles
the training program's own data-parallel step (:func:`experiments.train.jit_train_step`: state
replicated, batch split over a ``data`` mesh axis) for ``--devices`` CPU host devices, on
abstract inputs at the stated per-device batch, and reads from the compiled program:

* every collective (kind, operand shapes, bytes) and how often it runs per batch: a collective in
  a ``while`` body runs its known trip count times; the random-step rule's forward prefix has a
  data-dependent count, taken at its mean, (T - 1) / 2;
* the gradient reductions: for each weight kernel, how often per batch an all-reduce carries an
  array of its shape (the online rule should reduce every gradient T times per batch, the other
  rules once), and the collectives of the forward pass (the BatchNorm statistics of the global
  batch) apart from those of the backward pass;
* XLA's cost analysis: FLOPs and bytes accessed per device. XLA counts a loop body once, so the
  online rule's FLOPs come from the same step with its time scan unrolled, and the random step's
  from the online step per time step plus the expected forward-only prefix (the evaluation
  step's FLOPs per time step).

From these, :func:`predict` gives the step time per batch on stated hardware (:data:`HARDWARE`)
with the model written in :data:`MODEL`, and the same with three ways of lowering the cost that do
not change the method. ``docs/scaling.md`` shows the table, the model and its constants.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any, NamedTuple
from unittest import mock

from benchmarks import throughput

MODEL = (
  "step time per batch = compute + communication, no overlap (the compiled program runs its "
  "collectives synchronously). compute = FLOPs per device / (peak FLOP/s x mfu). Each collective "
  "execution costs latency + 2 (n - 1) / n x bytes / bandwidth (ring all-reduce; an all-gather "
  "or reduce-scatter costs half the bandwidth term). Scaling efficiency = compute / step time "
  "(weak scaling: the per-device batch is fixed, so compute per device does not change with n)."
)


class Hardware(NamedTuple):
  name: str
  peak_flops: dict[str, float]  # FLOP/s per accelerator by the config's compute dtype
  links: tuple[tuple[int, float, float], ...]  # (up to n accelerators, bytes/s, latency s)
  sources: str

  def link(self, n: int) -> tuple[float, float]:
    for upto, bandwidth, latency in self.links:
      if n <= upto:
        return bandwidth, latency
    raise ValueError(f"n={n} accelerators is not allowed for {self.name}; at most {upto}")


HARDWARE = {
  "h100": Hardware(
    "H100 SXM, 8 per node on NVLink, nodes on 8x400 Gb/s InfiniBand",
    {"float32": 494.5e12, "bfloat16": 989.4e12},
    ((8, 450e9, 10e-6), (1 << 20, 400e9, 25e-6)),
    "peak: NVIDIA H100 SXM datasheet, TF32 tensor core 989 TFLOP/s with sparsity, 494.5 dense "
    "(JAX runs float32 convolutions in TF32 on it by default), BF16 1979 with sparsity, 989.4 "
    "dense; NVLink 4: 900 GB/s per GPU, 450 "
    "GB/s each way; across nodes: DGX H100, 8 ConnectX-7 400 Gb/s NICs per node, 50 GB/s each "
    "way per GPU, and NCCL spreads a node's rings over all 8, so a ring all-reduce across nodes "
    "moves 8 x 50 = 400 GB/s per node; latency per collective: 10 us in a node, 25 us across "
    "nodes, an assumed round figure of the order of NCCL's small-message all-reduce, not a vendor "
    "figure",
  ),
  "tpu_v5e": Hardware(
    "TPU v5e pod (256 chips, 2D torus)",
    {"float32": 197e12, "bfloat16": 197e12},
    ((256, 200e9, 10e-6),),
    "peak: Google Cloud TPU v5e documentation, 197 TFLOP/s bf16 per chip (float32 matrix "
    "products run as bf16 passes at JAX's default precision); bandwidth: the same page, "
    "inter-chip interconnect 1600 Gb/s per chip and all-reduce bandwidth 51.2 TB/s per 256-chip "
    "pod, i.e. 200 GB/s per chip; latency per collective: 10 us, an assumed round figure, not a "
    "vendor figure",
  ),
}

DEVICE_COUNTS = (8, 64, 256)
MFU = 0.35  # the assumed fraction of peak FLOP/s, stated with the model


@dataclasses.dataclass(frozen=True)
class Case:
  """A shipped config with the network and weights it trains, and the per-device batch."""

  config: str
  overrides: tuple[str, ...]
  num_classes: int
  image_shape: tuple[int, ...]
  per_device_batch: int
  why_batch: str


CASES = {
  "resnet18_cifar10_binary": Case(
    "experiments/configs/cifar10.py",
    (),
    10,
    (32, 32, 3),
    64,
    "the config's batch of 64, now per device",
  ),
  "resnet18_cifar10_ternary": Case(
    "experiments/configs/cifar10.py",
    ("--config.model.weights=ternary",),
    10,
    (32, 32, 3),
    64,
    "the config's batch of 64, now per device",
  ),
  "resnet34_imagenet_ternary": Case(
    "experiments/configs/imagenet.py",
    (),
    1000,
    (224, 224, 3),
    32,
    "the config's batch of 256 over 8 accelerators",
  ),
}
LABELS = {
  "resnet18_cifar10_binary": "ResNet-18 CIFAR binary",
  "resnet18_cifar10_ternary": "ResNet-18 CIFAR ternary",
  "resnet34_imagenet_ternary": "ResNet-34 ImageNet ternary",
}
SMOKE_CASE = "convnet_small_digits"
CASES[SMOKE_CASE] = Case(
  "experiments/configs/digits.py", (), 10, (8, 8, 1), 4, "a tiny batch: the smoke run and the tests"
)
DEFAULT_CASES = ("resnet18_cifar10_binary", "resnet18_cifar10_ternary", "resnet34_imagenet_ternary")

MODES = ("online", "random_step", "bptt")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


# --- reading the compiled program -------------------------------------------------------------


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array type ``f32[3,3,64]`` in ``text``: (element type, dimensions)."""
  return [
    (kind, tuple(int(d) for d in dims.split(",") if d))
    for kind, dims in re.findall(r"\b(f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[([\d,]*)\]", text)
  ]


def _nbytes(kind: str, dims: tuple[int, ...]) -> int:
  return _BYTES[kind] * math.prod(dims)


def _computations(hlo: str) -> dict[str, list[str]]:
  """The instruction lines of each computation of an HLO module's text, by name."""
  computations: dict[str, list[str]] = {}
  current: list[str] = []
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and not line.startswith(" "):
      current = computations.setdefault(
        ("ENTRY " if line.startswith("ENTRY") else "") + header[1], []
      )
    elif line.startswith(" ") and "=" in line:
      current.append(line.strip())
  return computations


def _multiplicities(
  computations: dict[str, list[str]], unknown_trip_count: float
) -> dict[str, float]:
  """How often each computation runs per call of the entry: a while body its known trip count
  (``unknown_trip_count`` where the count is data-dependent) times its caller's count."""
  names = {name.removeprefix("ENTRY "): name for name in computations}
  entry = next(name for name in computations if name.startswith("ENTRY "))
  counts: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, count: float) -> None:
    counts[name] += count
    for line in computations[name]:
      trips = 1.0
      if re.search(r"\bwhile\(", line):
        known = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        trips = float(known[1]) if known else unknown_trip_count
      for key, called in re.findall(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)", line):
        if called in names and key != "to_apply" and key != "condition":
          visit(names[called], count * (trips if key == "body" else 1.0))
      for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
        for called in re.findall(r"%?([\w.\-]+)", branches):
          if called in names:
            visit(names[called], count)

  visit(entry, 1.0)
  return dict(counts)


def collectives(hlo: str, unknown_trip_count: float = 1.0) -> list[dict[str, Any]]:
  """Every collective of a compiled program: kind, operand shapes and bytes, phase (``backward``
  when it comes from a transpose, i.e. a gradient; else ``forward``) and executions per call."""
  computations = _computations(hlo)
  counts = _multiplicities(computations, unknown_trip_count)
  found = []
  for name, lines in computations.items():
    for line in lines:
      kinds = [k for k in COLLECTIVES if re.search(rf"(?<![%\w.-]){k}(-start)?\(", line)]
      if not kinds or name not in counts:
        continue
      result_type = line.split("=", 1)[1].split(kinds[0], 1)[0]
      shapes = _shapes(result_type)
      op = re.search(r'op_name="([^"]*)"', line)
      found.append(
        {
          "kind": kinds[0],
          "computation": name.removeprefix("ENTRY "),
          "shapes": [[kind, list(dims)] for kind, dims in shapes],
          "bytes": sum(_nbytes(kind, dims) for kind, dims in shapes),
          "phase": "backward" if op and "transpose(" in op[1] else "forward",
          "asynchronous": f"{kinds[0]}-start(" in line,
          "executions": counts[name],
        }
      )
  return found


def _key(dims: tuple[int, ...] | list[int]) -> tuple[int, ...]:
  """A shape without its size-1 dimensions, sorted: the same for an array and its transpose."""
  return tuple(sorted(d for d in dims if d != 1))


def gradient_reductions(found: list[dict[str, Any]], kernels: list[tuple[int, ...]]) -> dict:
  """How often per batch each weight kernel's gradient is all-reduced: the executions of
  all-reduce operands with a kernel's shape, over the number of kernels of that shape."""
  per_shape = collections.Counter(_key(k) for k in kernels)
  executions: dict[tuple[int, ...], float] = collections.defaultdict(float)
  for item in found:
    if item["kind"] != "all-reduce":
      continue
    for _, dims in item["shapes"]:
      if _key(dims) in per_shape:
        executions[_key(dims)] += item["executions"]
  ratios = {shape: executions[shape] / count for shape, count in per_shape.items()}
  return {
    "kernels": len(kernels),
    "per_kernel_min": min(ratios.values()) if ratios else 0.0,
    "per_kernel_max": max(ratios.values()) if ratios else 0.0,
  }


def totals(found: list[dict[str, Any]], phase: str | None = None) -> tuple[float, float]:
  """Executions and bytes moved per call, of every collective or of one ``phase``'s."""
  picked = [c for c in found if phase is None or c["phase"] == phase]
  return (
    sum(c["executions"] for c in picked),
    sum(c["bytes"] * c["executions"] for c in picked),
  )


def summary(found: list[dict[str, Any]]) -> dict[str, Any]:
  """Collectives per batch by kind and phase: static count, executions and bytes moved."""
  table: dict[str, dict[str, float]] = {}
  for item in found:
    row = table.setdefault(
      f"{item['kind']} {item['phase']}", {"in_program": 0, "executions": 0.0, "bytes": 0.0}
    )
    row["in_program"] += 1
    row["executions"] += item["executions"]
    row["bytes"] += item["bytes"] * item["executions"]
  return table


# --- the model --------------------------------------------------------------------------------


def collective_seconds(item: dict[str, Any], n: int, hardware: Hardware, scale: float = 1) -> float:
  """One execution of a collective on ``n`` accelerators: latency + ring bandwidth term."""
  bandwidth, latency = hardware.link(n)
  share = 1.0 if item["kind"] == "all-reduce" else 0.5
  return latency + share * 2 * (n - 1) / n * item["bytes"] * scale / bandwidth


def predict(record: dict[str, Any], hardware: Hardware, n: int, mfu: float) -> dict[str, float]:
  """Step time per batch and scaling efficiency on ``n`` accelerators, and with each way of
  lowering the communication cost that keeps the method:

  * ``bf16``: the backward (gradient) collectives reduce bfloat16, half the bytes;
  * ``fused``: the backward collectives of one update are one reduction (one latency per
    update; XLA's combiner already merges some, :func:`summary` counts them);
  * ``overlap``: the backward collectives run while the program computes: a layer's gradient
    reduction need only finish before that layer's next forward, so the rest of the backward
    pass and the next step's forward can hide it (at most the whole compute time); the forward's
    BatchNorm reductions stay on the critical path (the next layer needs their result);
  * ``all``: the three together.
  """
  compute = record["flops_per_device"] / (hardware.peak_flops[record["compute_dtype"]] * mfu)
  found = record["collectives"]

  def as_compiled(phase: str, scale: float = 1.0) -> float:
    return sum(
      collective_seconds(c, n, hardware, scale) * c["executions"]
      for c in found
      if c["phase"] == phase
    )

  def fused(scale: float = 1.0) -> float:
    """The backward as one all-reduce per update, its bytes scaled by ``scale``."""
    bandwidth, latency = hardware.link(n)
    backward_bytes = totals(found, "backward")[1]
    return record["updates_per_batch"] * latency + 2 * (n - 1) / n * backward_bytes * scale / (
      bandwidth
    )

  forward, backward = as_compiled("forward"), as_compiled("backward")

  def step(comm: float) -> dict[str, float]:
    total = compute + comm
    return {"step_s": total, "efficiency": compute / total, "communication_share": comm / total}

  return {
    "compute_s": compute,
    "forward_collectives_s": forward,
    "backward_collectives_s": backward,
    "as_compiled": step(forward + backward),
    "bf16": step(forward + as_compiled("backward", 0.5)),
    "fused": step(forward + fused()),
    "overlap": step(forward + max(0.0, backward - compute)),
    "all": step(forward + max(0.0, fused(0.5) - compute)),
  }


# --- compiling the steps ----------------------------------------------------------------------


def _config(case: Case, mode: str):
  from benchmarks.config_memory import load_config

  return load_config(case.config, [*case.overrides, f"--config.mode={mode}"])


@contextlib.contextmanager
def accelerator_form():
  """Traces the network as it runs on a GPU or TPU although JAX runs on the CPU: BatchNorm sums
  by XLA's reductions (not the CPU's matrix products, :func:`empf_jax.ops.channel_sums`), so the
  compiled program's collectives and FLOPs are those of the accelerator's program. (The
  convolutions' backward rule is set per network, :func:`empf_jax.layers.set_conv_backward`.)"""
  from empf_jax import ops

  with mock.patch.object(ops, "_sums_by_matmul", lambda: False):
    yield


def compiled(case: Case, mode: str, devices: int, unroll: bool = False, evaluation: bool = False):
  """The compiled data-parallel train (or evaluation) step of a case on ``devices`` devices, in
  its accelerator form, the kernels (rank >= 2 parameters) of its network and its config."""
  with accelerator_form():
    return _compiled(case, mode, devices, unroll, evaluation)


def _compiled(case: Case, mode: str, devices: int, unroll: bool, evaluation: bool):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from empf_jax import layers, models, training
  from experiments import train

  config = _config(case, mode)
  options = train.net_options(config, case.num_classes, case.image_shape)
  optimizer = train.build_optimizer(config)
  model = nnx.eval_shape(lambda: models.create(options))
  layers.set_conv_backward(model, "native")  # the rule of every backend but the CPU
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.eval_shape(optimizer.init, params)
  state = training.TrainState(params, rest, opt_state, jax.ShapeDtypeStruct((), jnp.int32))
  step_config = train.step_config(config, case.num_classes, static_input=True)._replace(
    time_unroll=unroll
  )
  mesh = jax.make_mesh(
    (devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices]
  )
  batch = devices * case.per_device_batch
  x = jax.ShapeDtypeStruct((batch, *case.image_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if evaluation:
    step = train.jit_eval_step(graphdef, step_config, mesh)
    lowered = step.lower(state, x, labels, jax.ShapeDtypeStruct((batch,), jnp.float32))
  else:
    step = train.jit_train_step(graphdef, optimizer, step_config, mesh)
    lowered = step.lower(
      state,
      x,
      labels,
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.eval_shape(lambda: jax.random.key(0)),
    )
  kernels = [tuple(leaf.shape) for leaf in jax.tree.leaves(params) if len(leaf.shape) >= 2]
  return lowered.compile(), kernels, config


def _cost(compiled_step) -> dict[str, float]:
  cost = compiled_step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}


def measure(case_name: str, mode: str, devices: int) -> dict[str, Any]:
  """The record of one case and rule: collectives, gradient reductions and cost per device."""
  case = CASES[case_name]
  started = time.perf_counter()
  program, kernels, config = compiled(case, mode, devices)
  steps = config.time_steps
  prefix = (steps - 1) / 2  # random step: t* uniform in 0..T-1 forward-only steps before it
  found = collectives(program.as_text(), unknown_trip_count=prefix)
  record: dict[str, Any] = {
    "case": case_name,
    "mode": mode,
    "time_steps": steps,
    "devices_compiled": devices,
    "per_device_batch": case.per_device_batch,
    "per_device_batch_why": case.why_batch,
    "config": " ".join([case.config, *case.overrides, f"--config.mode={mode}"]),
    "updates_per_batch": steps if mode == "online" else 1,
    "compute_dtype": config.compute_dtype,
    "collectives": found,
    "summary": summary(found),
    "gradient_reductions": gradient_reductions(found, kernels),
    "gradient_bytes": sum(4 * math.prod(k) for k in kernels),
    "cost_as_compiled": _cost(program),
  }
  if mode == "online":
    unrolled = measure_cost(case, mode, devices, unroll=True)
    record["cost"] = unrolled["cost"]
    record["cost_source"] = "the same step with its time scan unrolled"
    record["unrolled_collectives"] = unrolled["collectives"]
  elif mode == "random_step":
    online = measure_cost(case, "online", devices, unroll=True)["cost"]
    evaluation, _, _ = compiled(case, mode, devices, evaluation=True)
    forward_step = _cost(evaluation)["flops"] / steps
    record["cost"] = {
      "flops": online["flops"] / steps + prefix * forward_step,
      "bytes_accessed": record["cost_as_compiled"]["bytes_accessed"],
    }
    record["cost_source"] = (
      "the online step's FLOPs per time step (unrolled) plus (T - 1) / 2 forward-only steps at "
      "the evaluation step's FLOPs per time step; bytes as compiled"
    )
  else:
    record["cost"] = record["cost_as_compiled"]
    record["cost_source"] = "as compiled (no loop in the program)"
  record["flops_per_device"] = record["cost"]["flops"]
  record["compile_seconds"] = round(time.perf_counter() - started, 1)
  return record


_COST_CACHE: dict[tuple, dict[str, dict[str, float]]] = {}


def measure_cost(case: Case, mode: str, devices: int, unroll: bool) -> dict[str, dict[str, float]]:
  """XLA's cost analysis of a compiled step (``cost``) and the executions and bytes of its
  collectives (``collectives``); compiled once per process (the random step reuses the online
  step's)."""
  key = (case, mode, devices, unroll)
  if key not in _COST_CACHE:
    program, _, _ = compiled(case, mode, devices, unroll=unroll)
    executions, moved = totals(collectives(program.as_text()))
    _COST_CACHE[key] = {
      "cost": _cost(program),
      "collectives": {"executions": executions, "bytes": moved},
    }
  return _COST_CACHE[key]


def table(records: list[dict[str, Any]], mfu: float) -> list[dict[str, Any]]:
  """The predicted rows: per case, rule, hardware and accelerator count."""
  rows = []
  for record in records:
    for hardware_name, hardware in HARDWARE.items():
      for n in DEVICE_COUNTS:
        prediction = predict(record, hardware, n, mfu)
        rows.append(
          {"case": record["case"], "mode": record["mode"], "hardware": hardware_name, "n": n}
          | prediction
        )
  return rows


def markdown(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
  """The tables of ``docs/scaling.md``: what the programs communicate, and the predictions."""
  lines = [
    "| case | rule | collectives per batch (forward + backward) | bytes per batch | "
    "kernel gradients reduced per batch | GFLOP per device |",
    "|---|---|---|---|---|---|",
  ]
  for r in records:
    forward = totals(r["collectives"], "forward")[0]
    backward = totals(r["collectives"], "backward")[0]
    moved = totals(r["collectives"])[1]
    g = r["gradient_reductions"]
    reduced = f"{g['per_kernel_min']:g}" + (
      "" if g["per_kernel_min"] == g["per_kernel_max"] else f"-{g['per_kernel_max']:g}"
    )
    lines.append(
      f"| {LABELS.get(r['case'], r['case'])} | {r['mode']} | {forward:g} + {backward:g} | "
      f"{moved / 2**20:.1f} MiB | "
      f"{reduced} | {r['flops_per_device'] / 1e9:.1f} |"
    )
  by_key = {(r["case"], r["mode"], r["hardware"], r["n"]): r for r in rows}
  cases = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
  columns = [(h, n) for h in HARDWARE for n in DEVICE_COUNTS]
  lines += [
    "",
    "Scaling efficiency as compiled, and (after the arrow) with all three ways of lowering the "
    "cost:",
    "",
    "| case | rule | " + " | ".join(f"{h} {n}" for h, n in columns) + " |",
    "|---|---|" + "---|" * len(columns),
  ]
  for case, mode in cases:
    cells = [
      f"{by_key[(case, mode, h, n)]['as_compiled']['efficiency']:.0%} → "
      f"{by_key[(case, mode, h, n)]['all']['efficiency']:.0%}"
      for h, n in columns
    ]
    lines.append(f"| {LABELS.get(case, case)} | {mode} | " + " | ".join(cells) + " |")
  n = DEVICE_COUNTS[1]
  times = [
    "",
    f"At {n} accelerators, the step per batch in milliseconds (collectives: forward + backward):",
    "",
    "| case | rule | hardware | compute | collectives | step |",
    "|---|---|---|---|---|---|",
  ]
  lowered = [
    "",
    f"At {n} accelerators, the scaling efficiency as compiled and with each way of lowering the "
    "cost:",
    "",
    "| case | rule | hardware | as compiled | bf16 | fused | overlap | all three |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for case, mode in cases:
    for h in HARDWARE:
      row = by_key[(case, mode, h, n)]
      first = f"| {LABELS.get(case, case)} | {mode} | {h} | "
      times.append(
        f"{first}{row['compute_s'] * 1e3:.1f} | "
        f"{row['forward_collectives_s'] * 1e3:.1f} + {row['backward_collectives_s'] * 1e3:.1f} | "
        f"{row['as_compiled']['step_s'] * 1e3:.1f} |"
      )
      ways = ("as_compiled", "bf16", "fused", "overlap", "all")
      lowered.append(first + " | ".join(f"{row[k]['efficiency']:.0%}" for k in ways) + " |")
  lines += times + lowered
  return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str, n: int = DEVICE_COUNTS[1]) -> None:
  """Efficiency at ``n`` accelerators per case and rule, as compiled and with all three ways of
  lowering the cost, one panel per hardware (predicted again from the result's records)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rows = table(result["records"], result["mfu"])
  cases = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
  fig, axes = plt.subplots(1, len(HARDWARE), figsize=(11, 4.2), sharey=True)
  for ax, (name, hardware) in zip(axes, HARDWARE.items(), strict=True):
    picked = {(r["case"], r["mode"]): r for r in rows if r["hardware"] == name and r["n"] == n}
    x = range(len(cases))
    for offset, key, label in ((-0.2, "as_compiled", "as compiled"), (0.2, "all", "all three")):
      ax.bar(
        [i + offset for i in x],
        [100 * picked[c][key]["efficiency"] for c in cases],
        width=0.4,
        label=label,
      )
    ax.set_xticks(list(x))
    ax.set_xticklabels(
      [f"{LABELS.get(case, case)}\n{mode}" for case, mode in cases],
      rotation=60,
      ha="right",
      fontsize=7,
    )
    ax.set_title(f"{hardware.name}, n = {n}", fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("predicted scaling efficiency (%)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="benchmarks/results/communication.json")
  parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--devices", type=int, default=8, help="CPU host devices to compile for")
  parser.add_argument(
    "--mfu",
    type=float,
    default=None,
    help=f"fraction of peak FLOP/s reached (default {MFU}; with --records, the JSON's)",
  )
  parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_CASE} on 2 devices only")
  parser.add_argument(
    "--plot", default="", help="also write this PNG: efficiency at 64 accelerators per case"
  )
  parser.add_argument(
    "--records",
    default="",
    help="a JSON this script wrote: predict again from its records (no compiling), e.g. with "
    "another --mfu",
  )
  args = parser.parse_args(argv)
  if args.smoke:
    args.cases, args.devices = SMOKE_CASE, 2
  for name, allowed in (("cases", CASES), ("modes", MODES)):
    for value in getattr(args, name).split(","):
      if value not in allowed:
        parser.error(f"--{name} value {value!r} is not allowed; allowed: {', '.join(allowed)}")
  if args.devices < 2:
    parser.error(f"--devices={args.devices} is not allowed; allowed: 2 or more")
  if args.mfu is not None and not 0 < args.mfu <= 1:
    parser.error(f"--mfu={args.mfu} is not allowed; allowed: 0 < mfu <= 1")
  return args


def predictions(result: dict[str, Any], mfu: float | None = None) -> str:
  """The Markdown tables of a JSON this script wrote, predicted again with the model and
  hardware of this module (at ``mfu``, default: the JSON's)."""
  mfu = result["mfu"] if mfu is None else mfu
  return markdown(result["records"], table(result["records"], mfu))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  if args.records:
    with open(args.records) as f:
      result = json.load(f)
    result["mfu"] = result["mfu"] if args.mfu is None else args.mfu
    print(predictions(result))
    if args.plot:
      plot(result, args.plot)
    return result
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  )
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()
  import jax

  if jax.device_count() < args.devices:
    raise SystemExit(
      f"--devices={args.devices}: JAX started with {jax.device_count()} devices "
      "(set XLA_FLAGS before JAX starts, or run this module as a program)"
    )
  mfu = MFU if args.mfu is None else args.mfu
  records = []
  for case in args.cases.split(","):
    for mode in args.modes.split(","):
      print(f"{case} {mode}: compiling for {args.devices} devices ...", flush=True)
      record = measure(case, mode, args.devices)
      g = record["gradient_reductions"]
      print(
        f"  {record['compile_seconds']} s; each kernel gradient reduced "
        f"{g['per_kernel_min']:g}-{g['per_kernel_max']:g} times per batch (T = "
        f"{record['time_steps']}); {record['flops_per_device'] / 1e9:.1f} GFLOP per device",
        flush=True,
      )
      records.append(record)
  rows = table(records, mfu)
  result = {
    "command": "python -m benchmarks.communication " + " ".join(argv or sys.argv[1:]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": platform.machine(),
    **throughput.cpu_description(),
    "jax": jax.__version__,
    "model": MODEL,
    "mfu": mfu,
    "hardware": {name: h._asdict() for name, h in HARDWARE.items()},
    "records": records,
    "predictions": rows,
  }
  throughput.write_record(args.out, result)
  print(markdown(records, rows))
  print(f"wrote {args.out}")
  if args.plot:
    plot(result, args.plot)
    print(f"wrote {args.plot}")
  return result


if __name__ == "__main__":
  main()
