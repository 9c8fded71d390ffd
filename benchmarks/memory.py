"""Compiled training-step memory against the number of time steps T (no arrays are allocated).

    python -m benchmarks.memory [--time_steps=1,2,4,8,16] [--modes=online,random_step,bptt]
        [--batch=64] [--width=1.0] [--unrolled] [--out=benchmarks/results/memory.json]

For each training rule and T, the train step of :func:`empf_jax.training.make_train_step` is
lowered on abstract inputs (``jax.ShapeDtypeStruct`` for the batch, ``nnx.eval_shape`` for the
network, ``jax.eval_shape`` for the optimizer state) and compiled with the train state donated,
as the training driver does; XLA's ``memory_analysis()`` of the compiled step gives its buffer
sizes. The figure of merit is temp + argument bytes (scratch buffers plus inputs); output and
alias (donated, reused) bytes are recorded too, and ``peak_bytes = temp + argument + output -
alias``.

Acceptance (docs/model.md §4: online and random-step memory is O(1) in T, BPTT's grows with T):
online and random-step memory within 5 % over T = 4..16, BPTT growing at least 3x over the same
range.

Every rule runs as the library ships it (the online rule's time scan rolled, the default of
``StepConfig.time_unroll``); ``--unrolled`` also measures the online rule with that scan fully
unrolled (``time_unroll=True``), whose memory grows with T: XLA fuses the unrolled steps'
elementwise optimizer updates into one another, so every step's weight gradient and updated
parameters stay alive until the last update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from empf_jax import models, ops, training

RESNET18_CIFAR = dict(name="resnet18", num_classes=10, in_channels=3, weights="binary")
FLAT_TOLERANCE = 0.05
BPTT_MIN_GROWTH = 3.0
ACCEPTANCE_RANGE = (4, 16)
MIB = 2**20


def abstract_train_state(
  network: dict[str, Any], time_steps: int, optimizer
) -> tuple[nnx.GraphDef, training.TrainState]:
  """The graph and a :class:`~empf_jax.training.TrainState` of ``jax.ShapeDtypeStruct`` leaves.

  Args:
    network: keyword arguments of :func:`empf_jax.models.create` without ``time_steps``.
    time_steps: T.
    optimizer: the optax optimizer whose state is included.
  """
  options = models.NetOptions(**network, time_steps=time_steps)
  model = nnx.eval_shape(lambda: models.create(options))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = jax.eval_shape(optimizer.init, params)
  return graphdef, training.TrainState(params, rest, opt_state, jax.ShapeDtypeStruct((), jnp.int32))


def abstract_train_step(
  network: dict[str, Any],
  *,
  mode: str,
  time_steps: int,
  batch: int,
  image_shape: Sequence[int],
  unrolled: bool = False,
  static_input: bool = True,
) -> tuple[Callable, tuple]:
  """The jitted train step (train state donated) of a network and its abstract arguments.

  Args: as :func:`train_step_memory`.

  Returns:
    ``(step, args)``: ``step(*args)`` is one training batch; ``jax.eval_shape(step, *args)``
    traces it, ``step.lower(*args).compile()`` compiles it, neither allocates the arrays.
  """
  optimizer = training.make_optimizer()
  graphdef, state = abstract_train_state(network, time_steps, optimizer)
  config = training.StepConfig(
    mode=mode, time_steps=time_steps, num_classes=network["num_classes"], static_input=static_input
  )
  if unrolled:
    config = config._replace(time_unroll=True)
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
  seed_key = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.jit(training.make_train_step(graphdef, optimizer, config), donate_argnums=0)
  return step, (state, x, labels, learning_rate, seed_key)


def train_step_memory(
  network: dict[str, Any],
  *,
  mode: str,
  time_steps: int,
  batch: int,
  image_shape: Sequence[int],
  unrolled: bool = False,
  static_input: bool = True,
) -> dict[str, Any]:
  """Compiles one train step on abstract inputs and returns XLA's memory analysis in bytes.

  Args:
    network: keyword arguments of :func:`empf_jax.models.create` without ``time_steps``.
    mode: ``online``, ``random_step`` or ``bptt``.
    time_steps: T.
    batch: batch size.
    image_shape: one static image [H, W, C], or with ``static_input=False`` one example's
      sequence [T, ...].
    unrolled: the online time scan fully unrolled (``StepConfig(time_unroll=True)``) instead of
      the library's default.
    static_input: the image is fed at every step (direct encoding), or the input is a sequence.

  Returns:
    ``temp``, ``argument``, ``output``, ``alias``, ``generated_code`` bytes, ``total`` = temp +
    argument, ``peak`` = temp + argument + output - alias, and ``compile_seconds``.
  """
  start = time.perf_counter()
  step, args = abstract_train_step(
    network,
    mode=mode,
    time_steps=time_steps,
    batch=batch,
    image_shape=image_shape,
    unrolled=unrolled,
    static_input=static_input,
  )
  compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  sizes = {
    name: int(getattr(analysis, f"{name}_size_in_bytes"))
    for name in ("temp", "argument", "output", "alias", "generated_code")
  }
  sizes["total"] = sizes["temp"] + sizes["argument"]
  sizes["peak"] = sizes["total"] + sizes["output"] - sizes["alias"]
  return {
    "mode": mode,
    "time_steps": time_steps,
    "unrolled": unrolled,
    "bytes": sizes,
    "compile_seconds": round(seconds, 1),
  }


def sweep(
  network: dict[str, Any],
  *,
  modes: Sequence[str],
  time_steps: Sequence[int],
  batch: int,
  image_shape: Sequence[int],
  unrolled: bool = False,
  log: bool = False,
) -> list[dict[str, Any]]:
  """:func:`train_step_memory` for every mode and T (plus the unrolled online rule if asked)."""
  cases = [(mode, False) for mode in modes]
  if unrolled and "online" in modes:
    cases.append(("online", True))
  points = []
  for mode, roll in cases:
    for steps in time_steps:
      point = train_step_memory(
        network, mode=mode, time_steps=steps, batch=batch, image_shape=image_shape, unrolled=roll
      )
      points.append(point)
      if log:
        print(
          f"{mode}{' (unrolled)' if roll else ''} T={steps}: "
          f"{point['bytes']['total'] / MIB:.1f} MiB (temp {point['bytes']['temp'] / MIB:.1f},"
          f" compile {point['compile_seconds']} s)",
          flush=True,
        )
  return points


def series(
  points: Sequence[dict[str, Any]], mode: str, unrolled: bool = False, key: str = "total"
) -> dict[int, int]:
  """{T: bytes} of one mode."""
  return {
    p["time_steps"]: p["bytes"][key]
    for p in points
    if p["mode"] == mode and p["unrolled"] == unrolled
  }


def relative_spread(values: dict[int, int], lo: int, hi: int) -> float:
  """max / min - 1 over the T in [lo, hi]."""
  window = [v for t, v in values.items() if lo <= t <= hi]
  return max(window) / min(window) - 1.0


def acceptance(
  points: Sequence[dict[str, Any]], lo: int = ACCEPTANCE_RANGE[0], hi: int = ACCEPTANCE_RANGE[1]
) -> dict[str, dict[str, Any]]:
  """PASS/FAIL per criterion: online and random-step flat within 5 %, BPTT growth >= 3x."""
  checks = {}
  for mode, unrolled in (("online", False), ("random_step", False), ("online", True)):
    values = series(points, mode, unrolled)
    if not {lo, hi} <= values.keys():
      continue
    spread = relative_spread(values, lo, hi)
    checks[mode + (" (unrolled)" if unrolled else "")] = {
      "criterion": f"(max/min - 1) over T={lo}..{hi} <= {FLAT_TOLERANCE:.0%}",
      "value": round(spread, 4),
      "passed": spread <= FLAT_TOLERANCE,
    }
  values = series(points, "bptt")
  if {lo, hi} <= values.keys():
    growth = values[hi] / values[lo]
    checks["bptt"] = {
      "criterion": f"memory(T={hi}) / memory(T={lo}) >= {BPTT_MIN_GROWTH}",
      "value": round(growth, 3),
      "passed": growth >= BPTT_MIN_GROWTH,
    }
  return checks


def plot(points: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Memory (temp + argument, MiB) against T, one line per mode."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, unrolled in sorted({(p["mode"], p["unrolled"]) for p in points}):
    values = series(points, mode, unrolled)
    ts = sorted(values)
    ax.plot(
      ts,
      [values[t] / MIB for t in ts],
      marker="o",
      linestyle="--" if unrolled else "-",
      label=mode + (" (time scan unrolled)" if unrolled else ""),
    )
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({p["time_steps"] for p in points}))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("time steps T")
  ax.set_ylabel("compiled train step: temp + arguments (MiB)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def environment() -> dict[str, Any]:
  """Versions and machine of a measurement."""
  import flax
  import optax

  return {
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "conv_backward": ops.conv_backward_rule(),
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--time_steps", default="1,2,4,8,16")
  parser.add_argument("--modes", default="online,random_step,bptt")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--size", type=int, default=32, help="image height and width")
  parser.add_argument(
    "--unrolled",
    action="store_true",
    help="also measure the online rule with its time scan fully unrolled",
  )
  parser.add_argument("--out", default="benchmarks/results/memory.json")
  parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  args = parser.parse_args(argv)
  network = dict(RESNET18_CIFAR, width=args.width)
  time_steps = [int(t) for t in args.time_steps.split(",")]
  modes = args.modes.split(",")
  for mode in modes:
    if mode not in training.MODES:
      parser.error(f"mode {mode!r} is not allowed; allowed: {', '.join(training.MODES)}")
  points = sweep(
    network,
    modes=modes,
    time_steps=time_steps,
    batch=args.batch,
    image_shape=(args.size, args.size, 3),
    unrolled=args.unrolled,
    log=True,
  )
  checks = acceptance(points)
  for name, check in checks.items():
    print(
      f"{'PASS' if check['passed'] else 'FAIL'} {name}: {check['criterion']} "
      f"(measured {check['value']})"
    )
  record = {
    "meta": {
      **environment(),
      "network": network,
      "batch": args.batch,
      "image_shape": [args.size, args.size, 3],
      "command": "python -m benchmarks.memory "
      + " ".join(argv if argv is not None else sys.argv[1:]),
    },
    "points": points,
    "acceptance": checks,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  plot(
    points,
    args.plot or os.path.splitext(args.out)[0] + ".png",
    f"ResNet-18 (width {args.width:g}), {args.size}x{args.size}x3, batch {args.batch}, "
    f"binary weights, {jax.default_backend()}",
  )
  return record


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
