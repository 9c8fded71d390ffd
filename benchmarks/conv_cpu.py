"""CPU speed of convolutions: XLA's native transpose rules, the custom VJP and PyTorch.

For a few layer shapes it times the forward pass, dL/dx, dL/dw and ``value_and_grad`` of
<conv2d(x, w), g> under both backward rules of :func:`empf_jax.ops.set_conv_backward`, then the
full loss gradient of a ResNet-18 (width 0.5, T = 1, input [1, 8, 32, 32, 3]). Every function is
compiled and warmed up first; then the two rules alternate round by round (the order flips every
round) so that load from other processes on a shared machine falls on both alike, and the median
over all timed calls is reported. A convolution costs 2 N H' W' KH KW C_in C_out floating-point
operations; dL/dx and dL/dw cost the same and ``value_and_grad`` three times that.

``--layers=resnet18`` takes instead every distinct convolution of the CIFAR ResNet-18 (width 1,
32x32 inputs) at ``--batch`` (default 64), with how often each occurs in one time step, and
``--torch`` times the same forward, dL/dx and dL/dw with PyTorch (``conv2d`` and the
``convolution_backward`` kernel its autograd calls, NCHW, one thread per core) in the same
alternation. The summary then gives one time step's convolution time in both frameworks, the
share of the online step that convolutions are and so the JAX/PyTorch ratio that convolutions
allow the whole step. The library's XLA defaults (:mod:`empf_jax.xla_defaults`) apply.

Usage::

  python -m benchmarks.conv_cpu [--out benchmarks/results/conv_cpu.json] [--rounds 5]
      [--repeats 5] [--layers=default|resnet18] [--batch=64] [--torch]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import empf_jax  # noqa: F401  (the library's XLA defaults, before JAX starts its backend)
from empf_jax import models, ops, training

MODES = ("native", "custom")
# What the library's default ("auto", :func:`empf_jax.ops.set_conv_backward`) uses on the CPU.
LIBRARY_RULE = "custom"
DEFAULT_OUT = pathlib.Path("benchmarks/results/conv_cpu.json")


class Layer(NamedTuple):
  """One convolution: input [batch, size, size, c_in], kernel [kernel, kernel, c_in, c_out]."""

  name: str
  batch: int
  size: int
  c_in: int
  c_out: int
  kernel: int
  stride: int
  padding: int

  @property
  def out_size(self) -> int:
    return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

  @property
  def flops(self) -> int:
    return (2 * self.batch * self.out_size ** 2 * self.kernel ** 2 * self.c_in * self.c_out)


LAYERS = (
    Layer("3x3 s1, 64x28x28x32 -> 64", 64, 28, 32, 64, 3, 1, 1),
    Layer("ResNet-18 3x3 s1, 16x32x32x64 -> 64", 16, 32, 64, 64, 3, 1, 1),
    Layer("ResNet-18 3x3 s2, 16x32x32x64 -> 128", 16, 32, 64, 128, 3, 2, 1),
    Layer("ResNet-18 shortcut 1x1 s2, 16x32x32x64 -> 128", 16, 32, 64, 128, 1, 2, 0),
    Layer("ImageNet stem 7x7 s2 (odd size), 16x63x63x3 -> 64", 16, 63, 3, 64, 7, 2, 3),
)
OPERATIONS = {"forward": 1, "input_grad": 1, "kernel_grad": 1, "value_and_grad": 3}
# The operations PyTorch times too (its autograd computes the two gradients in one kernel call
# only when both are needed; the online step needs both, timed here one at a time like JAX's).
TORCH_OPERATIONS = ("forward", "input_grad", "kernel_grad")


def resnet18_layers(batch: int) -> tuple[tuple[Layer, int], ...]:
  """Every distinct convolution of the CIFAR ResNet-18 (width 1, 32x32) and its count per step."""
  return (
      (Layer(f"stem 3x3 s1, {batch}x32x32x3 -> 64", batch, 32, 3, 64, 3, 1, 1), 1),
      (Layer(f"stage 1 3x3 s1, {batch}x32x32x64 -> 64", batch, 32, 64, 64, 3, 1, 1), 4),
      (Layer(f"stage 2 3x3 s2, {batch}x32x32x64 -> 128", batch, 32, 64, 128, 3, 2, 1), 1),
      (Layer(f"stage 2 shortcut 1x1 s2, {batch}x32x32x64 -> 128", batch, 32, 64, 128, 1, 2, 0), 1),
      (Layer(f"stage 2 3x3 s1, {batch}x16x16x128 -> 128", batch, 16, 128, 128, 3, 1, 1), 3),
      (Layer(f"stage 3 3x3 s2, {batch}x16x16x128 -> 256", batch, 16, 128, 256, 3, 2, 1), 1),
      (Layer(f"stage 3 shortcut 1x1 s2, {batch}x16x16x128 -> 256", batch, 16, 128, 256, 1, 2,
             0), 1),
      (Layer(f"stage 3 3x3 s1, {batch}x8x8x256 -> 256", batch, 8, 256, 256, 3, 1, 1), 3),
      (Layer(f"stage 4 3x3 s2, {batch}x8x8x256 -> 512", batch, 8, 256, 512, 3, 2, 1), 1),
      (Layer(f"stage 4 shortcut 1x1 s2, {batch}x8x8x256 -> 512", batch, 8, 256, 512, 1, 2, 0), 1),
      (Layer(f"stage 4 3x3 s1, {batch}x4x4x512 -> 512", batch, 4, 512, 512, 3, 1, 1), 3),
  )


def _compile(mode: str, fn: Callable, *args) -> Callable:
  """``fn`` jitted and compiled with ``mode``'s backward rule (the rule is read at trace time)."""
  previous = ops.set_conv_backward(mode)
  try:
    return jax.jit(fn).lower(*args).compile()
  finally:
    ops.set_conv_backward(previous)


def _layer_functions(layer: Layer) -> dict[str, Callable]:
  def conv(x, w):
    return ops.conv2d(x, w, layer.stride, layer.padding)

  def value_and_grad(x, w, g):
    return jax.value_and_grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1))(x, w)

  return {
      "forward": lambda x, w, g: conv(x, w),
      "input_grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
      "kernel_grad": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
      "value_and_grad": value_and_grad,
  }


def _interleaved_medians(compiled: dict[str, Callable], args: tuple, rounds: int,
                         repeats: int) -> dict[str, float]:
  """Median seconds per call of each function, the functions alternating round by round.

  A function's arguments are ``args``, or its own when ``args`` is a dict keyed like
  ``compiled`` (PyTorch takes its own tensors); results are waited for with
  ``jax.block_until_ready`` (a no-op on PyTorch tensors, which are ready on return on the CPU).
  """
  def call(name):
    return compiled[name](*(args[name] if isinstance(args, dict) else args))

  for name in compiled:
    jax.block_until_ready(call(name))
  samples = {name: [] for name in compiled}
  order = list(compiled)
  for _ in range(rounds):
    for name in order:
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call(name))
        samples[name].append(time.perf_counter() - start)
    order.reverse()
  return {name: statistics.median(times) for name, times in samples.items()}


def _torch_functions(layer: Layer) -> dict[str, Callable]:
  """PyTorch's forward, dL/dx and dL/dw of ``layer`` on NCHW tensors (one kernel call each)."""
  import torch  # pylint: disable=import-outside-toplevel
  stride, padding = [layer.stride] * 2, [layer.padding] * 2

  def backward(x, w, g, mask):
    return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, [1, 1], False,
                                               [0, 0], 1, mask)

  return {
      "forward": lambda x, w, g: torch.nn.functional.conv2d(x, w, None, stride, padding),
      "input_grad": lambda x, w, g: backward(x, w, g, [True, False, False])[0],
      "kernel_grad": lambda x, w, g: backward(x, w, g, [False, True, False])[1],
  }


def _relative_difference(a, b) -> float:
  """max |a - b| / max |b| over a pytree's leaves (the largest per leaf)."""
  return max(float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bench_layer(layer: Layer, rounds: int, repeats: int, device: jax.Device,
                with_torch: bool = False) -> dict:
  """Times every operation of ``layer`` under both rules (and PyTorch); GFLOP/s from the median."""
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal((layer.batch, layer.size, layer.size, layer.c_in),
                                         np.float32), device)
  w = jax.device_put(0.1 * rng.standard_normal(
      (layer.kernel, layer.kernel, layer.c_in, layer.c_out), np.float32), device)
  g = jax.device_put(rng.standard_normal(
      (layer.batch, layer.out_size, layer.out_size, layer.c_out), np.float32), device)
  result = {"layer": layer._asdict(), "mflop_per_conv": layer.flops / 1e6, "operations": {}}
  if with_torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch_args = tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(order)))
                       for a, order in ((x, (0, 3, 1, 2)), (w, (3, 2, 0, 1)), (g, (0, 3, 1, 2))))
    torch_fns = _torch_functions(layer)
  for op, fn in _layer_functions(layer).items():
    compiled = {mode: _compile(mode, fn, x, w, g) for mode in MODES}
    args = (x, w, g)
    if with_torch and op in TORCH_OPERATIONS:
      compiled["torch"] = torch_fns[op]
      args = {"native": args, "custom": args, "torch": torch_args}
    seconds = _interleaved_medians(compiled, args, rounds, repeats)
    flops = OPERATIONS[op] * layer.flops
    entry = {mode: {"median_ms": 1e3 * seconds[mode], "gflops": flops / seconds[mode] / 1e9}
             for mode in compiled}
    entry["speedup"] = seconds["native"] / seconds["custom"]
    entry["max_relative_difference"] = _relative_difference(
        compiled["custom"](x, w, g), compiled["native"](x, w, g))
    if "torch" in compiled:
      # JAX's result in PyTorch's layout against PyTorch's: the same convolution.
      order = (0, 3, 1, 2) if op != "kernel_grad" else (3, 2, 0, 1)
      reference = compiled["torch"](*args["torch"]).numpy()
      entry["torch_max_relative_difference"] = float(
          np.max(np.abs(np.asarray(compiled[LIBRARY_RULE](x, w, g)).transpose(order)
                        - reference)) / max(float(np.max(np.abs(reference))), 1e-30))
      entry["jax_over_torch_speed"] = seconds["torch"] / seconds[LIBRARY_RULE]
    result["operations"][op] = entry
  return result


def step_summary(layers: list[dict], counts: list[int], rule: str) -> dict:
  """One time step's convolution time (forward, dL/dx, dL/dw of every layer) in both frameworks.

  ``rule`` is the backward rule the library uses on the CPU (``LIBRARY_RULE``).
  The stem's dL/dx is counted too although the step does not need it (a few per cent of the
  stem's cost, which is small against the rest).
  """
  total = {"jax": 0.0, "torch": 0.0}
  for layer, count in zip(layers, counts):
    for op in TORCH_OPERATIONS:
      entry = layer["operations"][op]
      total["jax"] += count * entry[rule]["median_ms"]
      total["torch"] += count * entry["torch"]["median_ms"]
  return {"backward_rule": rule, "jax_conv_ms_per_step": total["jax"],
          "torch_conv_ms_per_step": total["torch"],
          "jax_over_torch_conv_speed": total["torch"] / total["jax"]}


def bench_resnet18(rounds: int, repeats: int, device: jax.Device) -> dict:
  """Loss and gradient (parameters) of ResNet-18, width 0.5, T = 1, on [1, 8, 32, 32, 3]."""
  model = models.create("resnet18", num_classes=10, time_steps=1, width=0.5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 8, 32, 32, 3), np.float32)
  targets = training.smoothed_targets(jax.nn.one_hot(np.arange(8) % 10, 10), 10)
  params, rest, x, targets = jax.device_put((params, rest, x, targets), device)

  def loss(params, rest, x, targets):
    net = training.fresh_merge(graphdef, params, rest)
    logits = net(x, train=True)
    return (training.cross_entropy(jnp.sum(logits, axis=0), targets),
            nnx.state(net, nnx.Not(nnx.Param)))

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  args = (params, rest, x, targets)
  compiled = {mode: _compile(mode, grad_fn, *args) for mode in MODES}
  seconds = _interleaved_medians(compiled, args, rounds, repeats)
  return {
      "model": "resnet18 width=0.5 time_steps=1 input [1, 8, 32, 32, 3] float32",
      "native_ms": 1e3 * seconds["native"],
      "custom_ms": 1e3 * seconds["custom"],
      "speedup": seconds["native"] / seconds["custom"],
      "max_relative_gradient_difference": _relative_difference(
          compiled["custom"](*args)[1], compiled["native"](*args)[1]),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON result file")
  parser.add_argument("--rounds", type=int, default=5, help="alternations of the two rules")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per rule per round")
  parser.add_argument("--layers", choices=("default", "resnet18"), default="default",
                      help="the layer shapes: a few (default) or every convolution of the CIFAR "
                      "ResNet-18 at --batch")
  parser.add_argument("--batch", type=int, default=64, help="batch size of --layers=resnet18")
  parser.add_argument("--torch", action="store_true",
                      help="time PyTorch's forward, dL/dx and dL/dw of the same layers too")
  args = parser.parse_args()
  if args.batch < 1:
    parser.error(f"--batch must be a positive integer, got {args.batch}")
  if args.torch:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  device = jax.devices("cpu")[0]
  load_before = os.getloadavg()
  chosen = (resnet18_layers(args.batch) if args.layers == "resnet18"
            else tuple((layer, 1) for layer in LAYERS))
  layers = []
  for layer, _ in chosen:
    result = bench_layer(layer, args.rounds, args.repeats, device, args.torch)
    layers.append(result)
    print(f"{layer.name} ({layer.flops / 1e6:.0f} MFLOP per convolution), GFLOP/s:")
    for op, entry in result["operations"].items():
      line = (f"  {op:15s} native {entry['native']['gflops']:6.1f}   custom "
              f"{entry['custom']['gflops']:6.1f}   speedup {entry['speedup']:.2f}x")
      if "torch" in entry:
        line += (f"   torch {entry['torch']['gflops']:6.1f}   JAX/PyTorch "
                 f"{entry['jax_over_torch_speed']:.2f}")
      print(line)
  summary = None
  if args.torch:
    summary = step_summary(layers, [count for _, count in chosen], LIBRARY_RULE)
    print(f"one time step's convolutions (forward, dL/dx, dL/dw, {summary['backward_rule']} "
          f"rule): JAX {summary['jax_conv_ms_per_step']:.1f} ms, PyTorch "
          f"{summary['torch_conv_ms_per_step']:.1f} ms, JAX/PyTorch speed "
          f"{summary['jax_over_torch_conv_speed']:.2f}")
  resnet = None
  if args.layers == "default":
    resnet = bench_resnet18(args.rounds, args.repeats, device)
    print(f"{resnet['model']}, loss and gradient: native {resnet['native_ms']:.1f} ms, custom "
          f"{resnet['custom_ms']:.1f} ms, speedup {resnet['speedup']:.2f}x")
  load_after = os.getloadavg()
  print(f"load average (1, 5, 15 min) before {load_before}, after {load_after} on "
        f"{os.cpu_count()} CPUs")
  report = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "load_average_before": load_before, "load_average_after": load_after},
      "method": {"rounds": args.rounds, "repeats": args.repeats,
                 "statistic": "median over rounds * repeats calls, rules interleaved"},
      "layers": layers,
  }
  if resnet is not None:
    report["resnet18"] = resnet
  if summary is not None:
    report["method"]["layer_counts_per_time_step"] = [count for _, count in chosen]
    report["step_convolutions"] = summary
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
