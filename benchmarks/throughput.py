"""Training and evaluation throughput of empf_jax against the PyTorch reference, in one run.

    python -m benchmarks.throughput [--device=cpu|gpu] \
        [--out=benchmarks/results/throughput_cpu.json]
        [--network=resnet18|convnet28] [--batch=16,64,128] [--time_steps=4] [--size=32]
        [--width=1.0] [--dtype=float32|bfloat16]
        [--modes=online,random_step,bptt,eval] [--frameworks=jax,torch] [--repeats=5]
        [--iters=2] [--warmup=1] [--threads=N] [--breakdown] [--smoke]

Both frameworks run ResNet-18 (binary weights, direct encoding of random 3-channel 32x32 images)
or ``convnet28`` (the Fashion-MNIST network: grey 28x28 images) with the same weights
(``empf_jax.convert``) and the same batches, at every batch size of ``--batch`` in turn:

* ``online``: T steps and T optimizer updates per batch (:func:`empf_jax.training.make_train_step`
  against ``torch_reference.online_step``);
* ``random_step``: the forward of steps t < t* without gradients, one update at t*; both
  frameworks use the same t* sequence (:func:`empf_jax.training.draw_time_step`);
* ``bptt``: loss on the sum of the T outputs, one update;
* ``eval``: all T steps in evaluation mode (JAX: :func:`empf_jax.training.make_eval_step`, which
  also counts spikes per layer; PyTorch: ``torch_reference.run_eval`` plus per-step accuracy);
* ``online_unrolled`` (diagnostic, not in the default list): the online rule with JAX's time scan
  fully unrolled (``StepConfig(time_unroll=True)``; the library rolls it by default) against the
  same PyTorch online loop.

A repeat is ``--iters`` batches, timed after the device has finished (``block_until_ready`` /
``torch.cuda.synchronize``); after ``--warmup`` untimed batches (JAX compiles there) the JAX and
PyTorch repeats alternate, so that both see the same load on a shared machine. Throughput is the
median over repeats, in images per second (one image = all T steps of it). On the CPU both
frameworks are pinned to the same cores (``--threads``, default: all cores this process may
use); on the GPU the script records peak device memory: JAX ``peak_bytes_in_use`` (the process
peak, so run one mode per process for a per-mode figure, as ``benchmarks/gpu.sh`` does) and
PyTorch ``max_memory_allocated`` (reset per mode).

``--breakdown`` also times one time step's forward and forward + backward (train mode, no
update) in both frameworks, and every distinct convolution alone (:func:`breakdown`), with its
GFLOP/s, its share of taps on the image (:func:`valid_tap_fraction`) and the highest ratio
XLA's convolutions leave the time step (:func:`convolution_ceiling`). ``--smoke`` shrinks
everything (width 1/16, T=2, batch 4, 8x8, one CPU core) for a quick check that the script runs.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

MODES = ("online", "random_step", "bptt", "eval", "online_unrolled")
NETWORKS = {"resnet18": dict(size=32, channels=3), "convnet28": dict(size=28, channels=1)}
DEFAULT_MODES = MODES[:4]
FRAMEWORKS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")
GOALS = (1.0, 1.2)
NUM_CLASSES = 10
# Tiny sizes; one core, because PyTorch's OpenMP pool slows down by orders of magnitude when
# its threads compete with other processes for the cores of a loaded machine.
SMOKE = dict(width=1 / 16, time_steps=2, batch=4, size=8, repeats=2, iters=1, warmup=1)
SMOKE_CPU_THREADS = 1


def batch_sizes(value: str) -> list[int]:
  """An argparse ``type``: comma-separated batch sizes, each an integer >= 1."""
  try:
    sizes = [int(b) for b in value.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(
      f"{value!r} is not allowed; allowed: integers >= 1, comma-separated"
    )
  return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument(
    "--out", default=None, help="JSON path (default benchmarks/results/throughput_<device>.json)"
  )
  parser.add_argument("--network", default="resnet18", choices=tuple(NETWORKS))
  parser.add_argument(
    "--batch",
    default="16,64,128",
    type=batch_sizes,
    help="batch sizes, comma-separated; each is measured in turn",
  )
  parser.add_argument("--time_steps", type=int, default=4)
  parser.add_argument(
    "--size",
    type=int,
    default=None,
    help="image height and width (default: the network's, 32 or 28)",
  )
  parser.add_argument("--width", type=float, default=1.0, help="channel multiplier")
  parser.add_argument(
    "--dtype", default="float32", choices=DTYPES, help="JAX compute dtype; bfloat16 runs JAX only"
  )
  parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
  parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--iters", type=int, default=2, help="batches per repeat")
  parser.add_argument("--warmup", type=int, default=1, help="untimed batches per framework")
  parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="CPU cores for both frameworks (default: all allowed cores)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--breakdown", action="store_true", help="also time one step's forward and forward+backward"
  )
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
  args = parser.parse_args(argv)
  args.batches = args.batch
  if args.size is None:
    args.size = NETWORKS[args.network]["size"]
  if args.smoke:
    for key, value in SMOKE.items():
      setattr(args, key, value)
    args.batches = [SMOKE["batch"]]
    if args.network == "convnet28":  # it needs its 28x28 inputs
      args.size = NETWORKS["convnet28"]["size"]
    if args.device == "cpu" and args.threads is None:
      args.threads = SMOKE_CPU_THREADS
  args.modes = args.modes.split(",")
  args.frameworks = args.frameworks.split(",")
  for name, values, allowed in (
    ("mode", args.modes, MODES),
    ("framework", args.frameworks, FRAMEWORKS),
  ):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f"{name} {bad} is not allowed; allowed: {', '.join(allowed)}")
  if args.dtype == "bfloat16" and "torch" in args.frameworks:
    parser.error("--dtype=bfloat16 is measured for JAX only; pass --frameworks=jax")
  for key in ("time_steps", "size", "repeats", "iters"):
    if getattr(args, key) < 1:
      parser.error(f"--{key}={getattr(args, key)} is not allowed; allowed: an integer >= 1")
  if args.out is None:
    args.out = f"benchmarks/results/throughput_{args.device}.json"
  return args


def pin_cores(threads: int | None) -> list[int]:
  """Restricts this process (so both XLA's and PyTorch's CPU thread pools) to ``threads`` cores.

  Must run before JAX creates its CPU client. Returns the cores in use.
  """
  cores = sorted(os.sched_getaffinity(0))
  if threads is not None:
    if not 1 <= threads <= len(cores):
      raise ValueError(
        f"--threads={threads} is not allowed; allowed: 1..{len(cores)} "
        "(the cores this process may use)"
      )
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  return cores


def cpu_description() -> dict[str, Any]:
  """The CPU model and its vector extensions from ``/proc/cpuinfo`` (Linux; empty elsewhere):
  JAX/PyTorch ratios differ between CPU models, so every figure records which one it ran on."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return {}
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  flags = set(fields.get("flags", "").split())
  return {
    "cpu_model": fields.get("model name", ""),
    "cpu_vector_extensions": sorted(
      flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}
    ),
  }


def median_rate(seconds: list[float], images: int) -> float:
  """Images per second of the median repeat."""
  return images / statistics.median(seconds)


class JaxRunner:
  """The jitted steps of one mode on one set of weights (the train state is donated)."""

  def __init__(self, model, args, mode: str, batches):
    import jax
    import jax.numpy as jnp

    from empf_jax import training

    self.jax = jax
    self.mode = mode
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rule = {"eval": "online", "online_unrolled": "online"}.get(mode, mode)
    config = training.StepConfig(
      mode=rule, time_steps=args.time_steps, num_classes=NUM_CLASSES, compute_dtype=dtype
    )
    if mode == "online_unrolled":
      config = config._replace(time_unroll=True)
    optimizer = training.make_optimizer()
    graphdef, state = training.create_train_state(model, optimizer)
    device = jax.devices()[0]
    # A copy: the train step donates its state, which must not delete the shared model's arrays.
    self.state = jax.tree.map(lambda a: jnp.array(a, copy=True), jax.device_put(state, device))
    self.batches = [tuple(jax.device_put(a, device) for a in batch) for batch in batches]
    self.lr = jnp.float32(0.01)
    self.seed_key = jax.random.key(args.seed)
    if mode == "eval":
      self.mask = jax.device_put(jnp.ones((len(batches[0][1]),), jnp.float32), device)
      self.step = jax.jit(training.make_eval_step(graphdef, config))
    else:
      self.step = jax.jit(training.make_train_step(graphdef, optimizer, config), donate_argnums=0)
    self.calls = 0

  def run(self, count: int) -> float:
    start = time.perf_counter()
    out = None
    for _ in range(count):
      x, y = self.batches[self.calls % len(self.batches)]
      if self.mode == "eval":
        out = self.step(self.state, x, y, self.mask)
      else:
        self.state, out = self.step(self.state, x, y, self.lr, self.seed_key)
      self.calls += 1
    self.jax.block_until_ready((self.state, out))
    return time.perf_counter() - start

  def peak_bytes(self) -> int | None:
    stats = self.jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class TorchRunner:
  """The reference's eager loop for one mode on its own copy of the network."""

  def __init__(self, torch_model, args, mode: str, batches, device):
    import torch

    from benchmarks import torch_reference as ref

    self.torch = torch
    self.ref = ref
    self.mode = mode
    self.device = device
    self.time_steps = args.time_steps
    self.model = copy.deepcopy(torch_model).to(device)
    self.optimizer = ref.make_optimizer(self.model)
    self.batches = []
    for x, y in batches:
      nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
      self.batches.append(
        (ref.repeat_static(nchw, args.time_steps), torch.from_numpy(y.astype("int64")).to(device))
      )
    import jax

    from empf_jax import training

    key = jax.random.key(args.seed)
    self.t_star = lambda step: int(training.draw_time_step(key, step, args.time_steps))
    self.calls = 0

  def sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def one(self, x, y) -> None:
    ref = self.ref
    if self.mode in ("online", "online_unrolled"):
      ref.online_step(self.model, self.optimizer, x, y)
    elif self.mode == "random_step":
      ref.random_step(self.model, self.optimizer, x, y, self.t_star(self.calls))
    elif self.mode == "bptt":
      ref.bptt_step(self.model, self.optimizer, x, y)
    else:
      logits = ref.run_eval(self.model, x)
      correct = (logits.cumsum(0).argmax(-1) == y[None]).sum(1)
      correct.cpu()

  def run(self, count: int) -> float:
    self.sync()
    start = time.perf_counter()
    for _ in range(count):
      x, y = self.batches[self.calls % len(self.batches)]
      self.one(x, y)
      self.calls += 1
    self.sync()
    return time.perf_counter() - start


def _interleaved(
  parts: dict[str, tuple[Callable[[], Any], Callable[[], Any]]],
  repeats: int,
  sync: Callable[[], None],
) -> dict[str, dict[str, float]]:
  """Median seconds of every (JAX, PyTorch) pair of callables, all timed in turn in each round
  after one untimed call each, so that every figure sees the same machine load."""

  def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start

  for jax_fn, torch_fn in parts.values():
    timed(jax_fn)
    timed(torch_fn)
  seconds = {name: ([], []) for name in parts}
  for _ in range(repeats):
    for name, (jax_fn, torch_fn) in parts.items():
      seconds[name][0].append(timed(jax_fn))
      seconds[name][1].append(timed(torch_fn))
  out = {}
  for name, (jax_times, torch_times) in seconds.items():
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    out[name] = {
      "jax_seconds": jax_s,
      "torch_seconds": torch_s,
      "jax_over_torch_speed": round(torch_s / jax_s, 3),
    }
  return out


def breakdown(model, torch_model, args, batch, device, repeats: int) -> dict[str, Any]:
  """Where the training time goes, JAX against PyTorch, all parts interleaved.

  ``one_step``: one time step's forward, forward + backward (train mode, zero neuron state,
  loss CE_ls(f_0, y), no update) and one optimizer update (SGD, Nesterov, coupled L2) of all
  parameters. ``convolutions``: forward, input gradient and kernel gradient of every distinct
  convolution of the network at this batch (JAX: ``empf_jax.ops.conv2d`` and its VJP, the rule
  the training step uses; PyTorch: ``F.conv2d`` and ``aten.convolution_backward``), with the
  number of times it occurs per time step.
  """
  import torch

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  result: dict[str, Any] = {
    "one_step": _interleaved(_one_step_parts(model, torch_model, batch, device), repeats, sync)
  }
  parts, counts, work = _convolution_parts(
    _distinct_convolutions(model, batch[0]), batch[0].shape[-1], device
  )
  with torch.no_grad():
    timings = _interleaved(parts, repeats, sync)
  for name, value in timings.items():
    value["per_step_count"] = counts[name]
    value.update(work[name])
    gflop = value["gflop"]
    value["jax_gflops"] = float(f"{gflop / value['jax_seconds']:.4g}")
    value["torch_gflops"] = float(f"{gflop / value['torch_seconds']:.4g}")
  result["convolutions"] = timings
  result["convolutions_per_step_total"] = _convolution_totals(timings)
  result["ceiling"] = convolution_ceiling(result)
  return result


def _one_step_parts(model, torch_model, batch, device) -> dict[str, tuple[Callable, Callable]]:
  """(JAX, PyTorch) callables of one time step's forward, forward + backward and update."""
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from benchmarks import torch_reference as ref
  from empf_jax import training

  x_np, y_np = batch
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  targets = training.smoothed_targets(y, NUM_CLASSES)

  def loss(params, rest, x, targets):
    net = training.fresh_merge(graphdef, params, rest)
    logits, _ = net.step(x, None, 0, train=True)
    return training.cross_entropy(logits, targets)

  optimizer = training.make_optimizer()
  opt_state = optimizer.init(params)
  update = functools.partial(training.apply_update, optimizer)
  jax_forward, jax_grad, jax_update = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(update)
  grads = jax_grad(params, rest, x, targets)
  net = copy.deepcopy(torch_model).to(device)
  net.train()
  torch_optimizer = ref.make_optimizer(net)
  x_t = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
  y_t = torch.from_numpy(y_np.astype("int64")).to(device)
  loss_fn = ref.loss_function()

  def torch_forward():
    net.reset()
    with torch.no_grad():
      loss_fn(net(x_t), y_t)

  def torch_forward_backward():
    net.reset()
    net.zero_grad()
    loss_fn(net(x_t), y_t).backward()

  torch_forward_backward()  # gradients in place for the update part
  return {
    "forward": (
      lambda: jax.block_until_ready(jax_forward(params, rest, x, targets)),
      torch_forward,
    ),
    "forward_backward": (
      lambda: jax.block_until_ready(jax_grad(params, rest, x, targets)),
      torch_forward_backward,
    ),
    "update": (
      lambda: jax.block_until_ready(jax_update(params, opt_state, grads)),
      torch_optimizer.step,
    ),
  }


def _distinct_convolutions(model, x_np) -> dict[tuple, int]:
  """{(input shape, kernel shape, stride, padding): occurrences per time step} of the network's
  convolutions, from the input shape each QConv records (``record=True``) in one step."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from empf_jax import layers, training

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def conv_inputs(params, rest, x):
    net = training.fresh_merge(graphdef, params, rest)
    training.set_recording(net, True)
    net.step(x, None, 0, train=True)
    return {
      path: variable.get_value()
      for path, variable in nnx.to_flat_state(nnx.pop(net, nnx.Intermediate))
      if path[-1] == "inputs"
    }

  convs = {
    path: module for path, module in nnx.iter_graph(model) if isinstance(module, layers.QConv)
  }
  shapes: dict[tuple, int] = {}
  for path, recorded in jax.eval_shape(conv_inputs, params, rest, jnp.asarray(x_np)).items():
    module = convs.get(tuple(path[:-1]))
    if module is None:  # a Dense layer
      continue
    (h,) = recorded
    key = (tuple(h.shape), tuple(module.kernel.shape), module.stride, module.padding)
    shapes[key] = shapes.get(key, 0) + 1
  return shapes


def _convolution_parts(shapes: dict[tuple, int], image_channels: int, device) -> tuple:
  """(parts, per-step counts, work) of the forward, input gradient and kernel gradient of every
  distinct convolution: (JAX, PyTorch) callables, occurrences per step, GFLOP and valid taps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch.nn.functional as F

  from empf_jax import ops

  conv_parts, counts, work = {}, {}, {}
  for (x_shape, w_shape, stride, padding), count in shapes.items():
    x_shape = (math.prod(x_shape[:-3]),) + x_shape[-3:]  # time and batch folded, as the layer
    kh, kw, cin, cout = w_shape
    name = f"{kh}x{kw} s{stride} {cin}->{cout} on {x_shape[0]}x{x_shape[1]}x{x_shape[2]}"
    rng = np.random.default_rng(0)
    xj = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
    wj = jnp.asarray(rng.normal(size=w_shape).astype(np.float32))
    conv = jax.jit(lambda a, b, s=stride, p=padding: ops.conv2d(a, b, s, p))
    g = jnp.ones_like(conv(xj, wj))
    input_grad = jax.jit(
      lambda a, b, g, s=stride, p=padding: jax.vjp(lambda a_: ops.conv2d(a_, b, s, p), a)[1](g)[0]
    )
    kernel_grad = jax.jit(
      lambda a, b, g, s=stride, p=padding: jax.vjp(lambda b_: ops.conv2d(a, b_, s, p), b)[1](g)[0]
    )
    xt = torch.from_numpy(np.asarray(xj).transpose(0, 3, 1, 2).copy()).to(device)
    wt = torch.from_numpy(np.asarray(wj).transpose(3, 2, 0, 1).copy()).to(device)
    gt = torch.ones_like(F.conv2d(xt, wt, stride=stride, padding=padding))

    def torch_backward(mask, xt=xt, wt=wt, gt=gt, s=stride, p=padding):
      with torch.no_grad():
        torch.ops.aten.convolution_backward(
          gt, xt, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask
        )

    conv_parts[f"{name}: forward"] = (
      lambda c=conv, a=xj, b=wj: jax.block_until_ready(c(a, b)),
      lambda xt=xt, wt=wt, s=stride, p=padding: F.conv2d(xt, wt, stride=s, padding=p),
    )
    conv_parts[f"{name}: input_grad"] = (
      lambda f=input_grad, a=xj, b=wj, g=g: jax.block_until_ready(f(a, b, g)),
      lambda f=torch_backward: f([True, False, False]),
    )
    conv_parts[f"{name}: kernel_grad"] = (
      lambda f=kernel_grad, a=xj, b=wj, g=g: jax.block_until_ready(f(a, b, g)),
      lambda f=torch_backward: f([False, True, False]),
    )
    out_h, out_w = g.shape[1], g.shape[2]
    gflop = 2 * x_shape[0] * out_h * out_w * kh * kw * cin * cout / 1e9
    taps = valid_tap_fraction(x_shape[1], kh, stride, padding)
    for op in ("forward", "input_grad", "kernel_grad"):
      counts[f"{name}: {op}"] = count
      work[f"{name}: {op}"] = {"gflop": float(f"{gflop:.4g}"), "valid_tap_fraction": round(taps, 3)}
    if cin == image_channels:  # the network's input: no gradient is taken, none computed
      counts[f"{name}: input_grad"] = 0
  return conv_parts, counts, work


def _convolution_totals(timings: dict[str, dict]) -> dict[str, dict[str, float]]:
  """Seconds per time step of all convolutions' forward, input and kernel gradients."""
  totals = {}
  for op in ("forward", "input_grad", "kernel_grad"):
    entries = [v for k, v in timings.items() if k.endswith(op)]
    jax_s = sum(v["jax_seconds"] * v["per_step_count"] for v in entries)
    torch_s = sum(v["torch_seconds"] * v["per_step_count"] for v in entries)
    totals[op] = {
      "jax_seconds": jax_s,
      "torch_seconds": torch_s,
      "jax_over_torch_speed": round(torch_s / jax_s, 3),
    }
  return totals


def valid_tap_fraction(size: int, kernel: int, stride: int, padding: int) -> float:
  """Fraction of a ``kernel`` x ``kernel`` convolution's taps that fall inside a ``size`` x
  ``size`` input (not on its zero padding), over all output positions.

  XLA's CPU convolution multiplies the padding's zeros too; a direct convolution that skips
  them (oneDNN's) does this fraction of the work, so at 4x4 inputs (0.69 for 3x3, padding 1)
  it has a third less to do."""
  out = (size + 2 * padding - kernel) // stride + 1
  inside = sum(1 for i in range(out) for j in range(kernel) if 0 <= i * stride - padding + j < size)
  return (inside / (out * kernel)) ** 2


def convolution_ceiling(result: dict[str, Any]) -> dict[str, Any]:
  """The highest JAX/PyTorch ratio one online time step (forward + backward + update) could
  reach if everything but XLA's convolutions took no time: PyTorch's whole time step over the
  JAX convolutions alone. Below a goal, no change outside the convolutions can meet it."""
  step = result["one_step"]
  torch_step = step["forward_backward"]["torch_seconds"] + step["update"]["torch_seconds"]
  jax_step = step["forward_backward"]["jax_seconds"] + step["update"]["jax_seconds"]
  jax_convs = sum(v["jax_seconds"] for v in result["convolutions_per_step_total"].values())
  torch_convs = sum(v["torch_seconds"] for v in result["convolutions_per_step_total"].values())
  return {
    "jax_time_step_seconds": jax_step,
    "torch_time_step_seconds": torch_step,
    "jax_convolutions_seconds": jax_convs,
    "torch_convolutions_seconds": torch_convs,
    "jax_rest_seconds": jax_step - jax_convs,
    "torch_rest_seconds": torch_step - torch_convs,
    "jax_over_torch_at_most": round(torch_step / jax_convs, 3),
  }


def random_batch(rng, batch_size: int, size: int, channels: int) -> tuple[Any, Any]:
  """One batch of random images [B, size, size, channels] (float32) and labels [B] (int32)."""
  import numpy as np

  return (
    rng.normal(size=(batch_size, size, size, channels)).astype(np.float32),
    rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
  )


def write_record(path: str, record: dict[str, Any]) -> None:
  """Writes a benchmark's JSON record, creating its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)


def load_average() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def _meta(args, argv, backend: str, cores: int, channels: int) -> dict[str, Any]:
  """What a record was measured with: command, sizes, versions, machine, settings, load."""
  import jax
  import torch

  from empf_jax import ops

  meta = {
    "command": "python -m benchmarks.throughput "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "network": args.network,
    "weights": "binary",
    "width": args.width,
    "time_steps": args.time_steps,
    "batches": args.batches,
    "image_shape": [args.size, args.size, channels],
    "jax_dtype": args.dtype,
    "torch_dtype": "float32",
    "repeats": args.repeats,
    "batches_per_repeat": args.iters,
    "warmup_batches": args.warmup,
    "device": args.device,
    "jax_backend": backend,
    "jax_device": str(jax.devices()[0].device_kind),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "python": platform.python_version(),
    "machine": platform.platform(),
    **cpu_description(),
    "cpus_visible": os.cpu_count(),
    "cores_used": cores,
    "torch_num_threads": torch.get_num_threads(),
    "conv_backward": ops.conv_backward_rule(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    "load_average_start": load_average(),
  }
  if len(args.batches) == 1:
    meta["batch"] = args.batches[0]
  if args.device == "gpu" and torch.cuda.is_available():
    meta["torch_cuda_device"] = torch.cuda.get_device_name()
    meta["torch_cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    meta["torch_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
  return meta


def _measure_mode(model, torch_model, args, mode: str, batches, torch_device) -> dict[str, Any]:
  """Images per second of each framework in ``mode``, repeats interleaved, and their ratio."""
  import torch

  images = batches[0][0].shape[0] * args.iters
  runners: dict[str, Callable[[int], float]] = {}
  entry: dict[str, Any] = {}
  if "jax" in args.frameworks:
    start = time.perf_counter()
    jax_runner = JaxRunner(model, args, mode, batches)
    jax_runner.run(args.warmup)
    entry["jax_first_batches_seconds"] = round(time.perf_counter() - start, 2)
    runners["jax"] = jax_runner.run
  if "torch" in args.frameworks:
    if torch_device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    torch_runner = TorchRunner(torch_model, args, mode, batches, torch_device)
    torch_runner.run(args.warmup)
    runners["torch"] = torch_runner.run
  seconds = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      seconds[name].append(run(args.iters))
  for name, times in seconds.items():
    entry[name] = {
      "images_per_second": round(median_rate(times, images), 3),
      "repeat_seconds": [round(t, 6) for t in times],
    }
  if set(seconds) == {"jax", "torch"}:
    entry["jax_over_torch"] = round(
      entry["jax"]["images_per_second"] / entry["torch"]["images_per_second"], 3
    )
    # Each JAX repeat against the PyTorch repeat right after it: less sensitive to load drift.
    entry["jax_over_torch_paired_median"] = round(
      statistics.median(t / j for j, t in zip(seconds["jax"], seconds["torch"])), 3
    )
  if args.device == "gpu":
    if "jax" in runners:
      entry["jax"]["process_peak_bytes_in_use"] = jax_runner.peak_bytes()
    if "torch" in runners:
      entry["torch"]["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
  return entry


def _print_breakdown(parts: dict[str, Any]) -> None:
  """One line per part of :func:`breakdown` and one for its ceiling."""
  for group in ("one_step", "convolutions_per_step_total"):
    for part, value in parts[group].items():
      print(
        f"{group} {part}: JAX {1e3 * value['jax_seconds']:.1f} ms, PyTorch "
        f"{1e3 * value['torch_seconds']:.1f} ms",
        flush=True,
      )
  ceiling = parts["ceiling"]
  print(
    f"one time step: JAX {1e3 * ceiling['jax_time_step_seconds']:.0f} ms (convolutions "
    f"{1e3 * ceiling['jax_convolutions_seconds']:.0f}), PyTorch "
    f"{1e3 * ceiling['torch_time_step_seconds']:.0f} ms (convolutions "
    f"{1e3 * ceiling['torch_convolutions_seconds']:.0f}); with XLA's convolutions the "
    f"ratio is at most {ceiling['jax_over_torch_at_most']:.2f}",
    flush=True,
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.device == "gpu":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cores = sorted(os.sched_getaffinity(0))
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cores = pin_cores(args.threads)
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  import jax

  backend = jax.default_backend()
  if args.device == "gpu" and backend != "gpu":
    raise SystemExit(f"--device=gpu: JAX runs on {backend!r}; no GPU is visible")
  import numpy as np
  import torch
  from flax import nnx

  from benchmarks import torch_reference as ref
  from empf_jax import convert, models

  if args.device == "gpu" and "torch" in args.frameworks and not torch.cuda.is_available():
    raise SystemExit("--device=gpu: PyTorch sees no CUDA device")
  torch_device = torch.device("cuda" if args.device == "gpu" else "cpu")
  if args.device == "cpu":
    torch.set_num_threads(len(cores))
  else:
    torch.backends.cudnn.benchmark = True

  channels = NETWORKS[args.network]["channels"]
  model = models.create(
    args.network,
    num_classes=NUM_CLASSES,
    time_steps=args.time_steps,
    width=args.width,
    in_channels=channels,
    rngs=nnx.Rngs(args.seed),
  )
  torch_model = ref.create(
    args.network,
    num_classes=NUM_CLASSES,
    time_steps=args.time_steps,
    width=args.width,
    in_channels=channels,
  )
  torch_model.load_state_dict(
    {k: torch.from_numpy(v) for k, v in convert.to_torch_state_dict(model).items()}
  )

  meta = _meta(args, argv, backend, len(cores), channels)
  print(
    f"{args.network} width {args.width:g}, T={args.time_steps}, batches {args.batches}, "
    f"{args.size}x{args.size}x{channels}, {args.device}, {len(cores)} cores, "
    f"load {meta['load_average_start']}",
    flush=True,
  )

  record: dict[str, Any] = {"meta": meta, "batches": {}}
  for batch_size in args.batches:
    rng = np.random.default_rng(args.seed)
    batches = [random_batch(rng, batch_size, args.size, channels) for _ in range(2)]
    print(f"== batch {batch_size} (load {load_average()})", flush=True)
    results = {}
    for mode in args.modes:
      entry = _measure_mode(model, torch_model, args, mode, batches, torch_device)
      results[mode] = entry
      rates = ", ".join(
        f"{name} {entry[name]['images_per_second']:.1f} img/s"
        for name in FRAMEWORKS
        if name in entry
      )
      ratio = (
        f" (JAX/PyTorch {entry['jax_over_torch']:.2f}x, paired "
        f"{entry['jax_over_torch_paired_median']:.2f}x)"
        if "jax_over_torch" in entry
        else ""
      )
      print(f"{mode}: {rates}{ratio}", flush=True)

    measured: dict[str, Any] = {"results": results, "load_average": load_average()}
    if args.breakdown and set(args.frameworks) == set(FRAMEWORKS):
      measured["breakdown"] = breakdown(
        model, torch_model, args, batches[0], torch_device, args.repeats
      )
      _print_breakdown(measured["breakdown"])
    online = results.get("online", {}).get("jax_over_torch")
    if online is not None:
      measured["goals"] = {f"online JAX/PyTorch >= {goal}": online >= goal for goal in GOALS}
      for goal, met in measured["goals"].items():
        print(f"batch {batch_size}: {'MET' if met else 'MISSED'}: {goal} (measured {online:.2f})")
    record["batches"][str(batch_size)] = measured
  if len(args.batches) == 1:  # one batch size: its entry at the top level too, as before
    record.update(record["batches"][str(args.batches[0])])
  meta["load_average_end"] = load_average()
  write_record(args.out, record)
  return record


if __name__ == "__main__":
  main()
