"""Where one jitted training step spends its time on the CPU: a ``jax.profiler`` trace grouped
by XLA operation and by the library line that emitted it.

    python -m benchmarks.investigations.profile_cpu [--network=resnet18|convnet28] [--batch=64]
        [--mode=online|random_step|bptt|eval] [--time_steps=4] [--width=1.0] [--steps=1]
        [--threads=N] [--top=30] [--out=benchmarks/results/profile_cpu.json] [--smoke]

The step is the one ``benchmarks.throughput`` times (:class:`benchmarks.throughput.JaxRunner`:
the library's train or evaluation step, jitted, state donated). After compiling and two
untimed calls, ``--steps`` calls run under ``jax.profiler.trace``; the trace's events are matched
to the instructions of the compiled module (``compiled.as_text()``), each instruction to its
kind (``convolution``, ``dot``, ``reduction`` for reduce and reduce-window, ``transpose``,
``elementwise`` for the other fusions, else its opcode) and to the innermost frame of its source
stack inside this repository (control flow, whose events span the operations inside it, is left
out). Printed and written: time per kind, the ``--top`` instructions and
source lines by time, and the step's wall time.

Reading it: XLA's CPU runtime runs operations in parallel on its thread pool, so traced times
can sum to more than the wall time, and a small operation's span includes waiting for a thread
behind a large one; change one thing and compare wall times (A/B) before believing a line.
Convolutions run in Eigen's own thread pool and their event spans only part of their work: take
their time from ``python -m benchmarks.throughput --breakdown``, which times each of them alone.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

from benchmarks import throughput

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Control flow: their events span the operations inside them, which are counted on their own.
CONTAINERS = ("while", "conditional", "call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\((.*)$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--network", default="resnet18", choices=tuple(throughput.NETWORKS))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--mode", default="online", choices=throughput.DEFAULT_MODES)
  parser.add_argument("--time_steps", type=int, default=4)
  parser.add_argument(
    "--size",
    type=int,
    default=None,
    help="image height and width (default: the network's, 32 or 28)",
  )
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier")
  parser.add_argument("--steps", type=int, default=1, help="traced calls of the step")
  parser.add_argument(
    "--threads", type=int, default=None, help="CPU cores (default: all allowed cores)"
  )
  parser.add_argument("--top", type=int, default=30, help="instructions and lines listed")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/profile_cpu.json")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
  args = parser.parse_args(argv)
  if args.size is None:
    args.size = throughput.NETWORKS[args.network]["size"]
  if args.smoke:
    smoke = throughput.SMOKE
    args.width, args.time_steps, args.batch = smoke["width"], smoke["time_steps"], smoke["batch"]
    if args.network != "convnet28":  # convnet28 needs its 28x28 inputs
      args.size = smoke["size"]
  for key in ("batch", "time_steps", "size", "steps", "top"):
    if getattr(args, key) < 1:
      parser.error(f"--{key}={getattr(args, key)} is not allowed; allowed: an integer >= 1")
  if not args.width > 0:
    parser.error(f"--width={args.width} is not allowed; allowed: a number > 0")
  # What JaxRunner reads.
  args.dtype = "float32"
  return args


def _stack_tables(text: str) -> dict[int, str]:
  """``stack_frame_id`` -> "file:line" of its innermost frame inside this repository (else its
  innermost frame), from the FileNames / FileLocations / StackFrames tables of an HLO module."""
  sections: dict[str, dict[int, str]] = collections.defaultdict(dict)
  current = None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = stripped
      continue
    if current is None:
      continue
    match = re.match(r"^(\d+)\s+(.*)$", stripped)
    if not match:
      current = None
      continue
    sections[current][int(match.group(1))] = match.group(2)
  files = {k: v.strip('"') for k, v in sections["FileNames"].items()}
  locations = {}
  for k, v in sections["FileLocations"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    path = files.get(int(fields.get("file_name_id", 0)), "?")
    locations[k] = (path, int(fields.get("line", 0)))
  frames = {}
  for k, v in sections["StackFrames"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[k] = (int(fields.get("file_location_id", 0)), int(fields.get("parent_frame_id", 0)))

  def describe(frame_id: int) -> str:
    chain, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location, parent = frames[frame_id]
      if location in locations:
        chain.append(locations[location])
      frame_id = parent
    ours = [
      (p, n)
      for p, n in chain
      if os.path.abspath(p).startswith(REPO + os.sep)
      or (not os.path.isabs(p) and p.startswith(("empf_jax", "benchmarks", "experiments")))
    ]
    path, number = (ours or chain or [("?", 0)])[0]
    return f"{os.path.relpath(path, REPO) if os.path.isabs(path) else path}:{number}"

  return {frame_id: describe(frame_id) for frame_id in frames}


def instructions(text: str) -> dict[str, dict[str, str]]:
  """Every instruction of a compiled HLO module: its kind and source line. A fusion's kind is
  that of the heaviest operation inside it (convolution > dot > reduction > transpose)."""
  stacks = _stack_tables(text)
  computations: dict[str, set[str]] = {}
  calls: dict[str, str] = {}
  entries: dict[str, dict[str, str]] = {}
  current: set[str] | None = None
  for line in text.splitlines():
    header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = computations.setdefault(header.group(1), set())
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    name, opcode, rest = match.groups()
    current.add(opcode)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if opcode == "fusion" and called:
      calls[name] = called.group(1)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    source = re.search(r'source_file="([^"]*)"\s+source_line=(\d+)', rest)
    where = (
      stacks.get(int(frame.group(1)), "?")
      if frame
      else f"{os.path.relpath(source.group(1), REPO)}:{source.group(2)}"
      if source
      else "?"
    )
    entries[name] = {
      "opcode": opcode,
      "source": where,
      "op_name": op_name.group(1) if op_name else "",
    }
  for name, entry in entries.items():
    ops = computations.get(calls.get(name, ""), {entry["opcode"]})
    if "convolution" in ops:
      kind = "convolution"
    elif "dot" in ops:
      kind = "dot"
    elif ops & {"reduce", "reduce-window"}:
      kind = "reduction"
    elif entry["opcode"] == "fusion" and "transpose" in ops:
      kind = "transpose"
    elif entry["opcode"] == "fusion":
      kind = "elementwise"
    else:
      kind = entry["opcode"]
    entry["kind"] = kind
  return entries


def trace_events(directory: str) -> list[dict[str, Any]]:
  """The complete events (with a duration) of the perfetto trace ``jax.profiler`` wrote."""
  paths = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(
      f"no perfetto trace under {directory}: jax.profiler wrote "
      f"{sorted(glob.glob(os.path.join(directory, '**'), recursive=True))[:10]}"
    )
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarize(
  events: list[dict[str, Any]], table: dict[str, dict[str, str]], steps: int, wall: float, top: int
) -> dict[str, Any]:
  per_instruction: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for event in events:
    args = event.get("args") or {}
    name = str(args.get("hlo_op") or event.get("name", "")).lstrip("%")
    if name in table and table[name]["opcode"] not in CONTAINERS:
      per_instruction[name][0] += event["dur"] / 1e6 / steps
      per_instruction[name][1] += 1
  if not per_instruction:
    names = collections.Counter(e.get("name") for e in events).most_common(8)
    raise SystemExit(f"no trace event names an instruction of the step; most frequent: {names}")
  kinds: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"seconds": 0.0, "calls": 0})
  sources: dict[str, float] = collections.defaultdict(float)
  for name, (seconds, count) in per_instruction.items():
    entry = table[name]
    kinds[entry["kind"]]["seconds"] += seconds
    kinds[entry["kind"]]["calls"] += count / steps
    sources[f"{entry['kind']} @ {entry['source']}"] += seconds
  ranked = sorted(per_instruction.items(), key=lambda kv: -kv[1][0])[:top]
  return {
    "step_wall_seconds": wall,
    "traced_seconds": sum(v[0] for v in per_instruction.values()),
    "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"])),
    "instructions": [
      {"name": name, "seconds": seconds, "calls": count / steps, **table[name]}
      for name, (seconds, count) in ranked
    ],
    "sources": [
      {"where": where, "seconds": seconds}
      for where, seconds in sorted(sources.items(), key=lambda kv: -kv[1])[:top]
    ],
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cores = throughput.pin_cores(args.threads)
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  import jax
  import numpy as np
  from flax import nnx

  from empf_jax import models

  channels = throughput.NETWORKS[args.network]["channels"]
  model = models.create(
    args.network,
    num_classes=throughput.NUM_CLASSES,
    time_steps=args.time_steps,
    width=args.width,
    in_channels=channels,
    rngs=nnx.Rngs(args.seed),
  )
  rng = np.random.default_rng(args.seed)
  batch = throughput.random_batch(rng, args.batch, args.size, channels)
  runner = throughput.JaxRunner(model, args, args.mode, [batch])
  x, y = runner.batches[0]
  call = (
    (runner.state, x, y, runner.mask)
    if args.mode == "eval"
    else (runner.state, x, y, runner.lr, runner.seed_key)
  )
  # The compiled step both names the instructions and runs (jit would compile it again).
  runner.step = runner.step.lower(*call).compile()
  table = instructions(runner.step.as_text())
  print(
    f"{args.network}, {args.mode}, batch {args.batch}, T={args.time_steps}, "
    f"{len(cores)} cores: {len(table)} instructions; warming up",
    flush=True,
  )
  runner.run(1)
  runner.run(1)
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      wall = runner.run(args.steps) / args.steps
    events = trace_events(directory)
  summary = summarize(events, table, args.steps, wall, args.top)
  record = {
    "meta": {
      "command": "python -m benchmarks.investigations.profile_cpu "
      + " ".join(argv if argv is not None else sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "network": args.network,
      "mode": args.mode,
      "batch": args.batch,
      "time_steps": args.time_steps,
      "width": args.width,
      "image_size": args.size,
      "steps": args.steps,
      "cores_used": len(cores),
      "jax": jax.__version__,
      **throughput.cpu_description(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average": throughput.load_average(),
    },
    **summary,
  }
  print(
    f"step: {1e3 * wall:.0f} ms wall, {1e3 * summary['traced_seconds']:.0f} ms in traced "
    "operations (they overlap; convolutions mostly untraced, see the module docstring)"
  )
  for kind, value in summary["kinds"].items():
    print(f"  {kind:<14} {1e3 * value['seconds']:9.1f} ms  {value['calls']:7.0f} calls")
  print("lines:")
  for entry in summary["sources"]:
    print(f"  {1e3 * entry['seconds']:9.1f} ms  {entry['where']}")
  throughput.write_record(args.out, record)
  return record


if __name__ == "__main__":
  main()
