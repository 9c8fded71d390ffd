"""CPU speed of the convolution gradient: XLA's native transpose rules against the custom VJP.

For a few layer shapes it times the forward pass, dL/dx, dL/dw and ``value_and_grad`` of
<conv2d(x, w), g> under both backward rules of :func:`empf_jax.ops.conv_backward_rule`, then the
full loss gradient of a ResNet-18 (width 0.5, T = 1, input [1, 8, 32, 32, 3]). Every function is
compiled and warmed up first; then the two rules alternate round by round (the order flips every
round) so that load from other processes on a shared machine falls on both alike, and the median
over all timed calls is reported. A convolution costs 2 N H' W' KH KW C_in C_out floating-point
operations; dL/dx and dL/dw cost the same and ``value_and_grad`` three times that.

``--kernel_grad_forms`` instead times other ways of writing dL/dw of the layer with the most
training time in ResNet-18 (3x3 stride 1, 64 -> 64 channels, 32x32, batch 64), each against the
forward convolution of the same layer: the library's rule (one convolution), patches (im2col)
and one matrix product, and nine matrix products, one per kernel tap.

``--xla_options`` times ``value_and_grad`` of that layer at batch 64 and 128 under XLA CPU
options that could hand convolutions to another library (YNNPACK, oneDNN, XNNPACK), each in its
own process (XLA reads its options once per process), against the library's defaults, and with
the batch split into 2, 4 or 8 convolutions; it records how many library fusions each compiled
program holds, so that an option XLA ignores reads as 0.

``--padding_forms`` times the forward and ``value_and_grad`` of ResNet-18's 3x3 stride-1
convolutions at batch 64 (64 channels at 32x32 down to 512 at 4x4) written three ways: the
library's (one XLA convolution, which multiplies the zero padding too), one matrix product per
kernel tap over only the outputs where that tap reads the image (the work a convolution that
skips the padding does: ``valid_tap_fraction`` of it), and Winograd F(2x2, 3x3) (16 batched
matrix products per 2x2 output tile, 2.25x fewer multiplications). GFLOP/s count the library's
work (padding included) for all three, so they compare times.

Usage::

  python -m benchmarks.investigations.conv_cpu [--out benchmarks/results/conv_cpu.json] [--rounds 5]
      [--repeats 5] [--kernel_grad_forms | --xla_options | --padding_forms]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from empf_jax import layers, models, ops, training

MODES = ("native", "custom")
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
    return 2 * self.batch * self.out_size**2 * self.kernel**2 * self.c_in * self.c_out


LAYERS = (
  Layer("3x3 s1, 64x28x28x32 -> 64", 64, 28, 32, 64, 3, 1, 1),
  Layer("ResNet-18 3x3 s1, 16x32x32x64 -> 64", 16, 32, 64, 64, 3, 1, 1),
  Layer("ResNet-18 3x3 s2, 16x32x32x64 -> 128", 16, 32, 64, 128, 3, 2, 1),
  Layer("ResNet-18 shortcut 1x1 s2, 16x32x32x64 -> 128", 16, 32, 64, 128, 1, 2, 0),
  Layer("ImageNet stem 7x7 s2 (odd size), 16x63x63x3 -> 64", 16, 63, 3, 64, 7, 2, 3),
)
OPERATIONS = {"forward": 1, "input_grad": 1, "kernel_grad": 1, "value_and_grad": 3}


def _layer_functions(layer: Layer, mode: str = "auto") -> dict[str, Callable]:
  def conv(x, w):
    return ops.conv2d(x, w, layer.stride, layer.padding, mode)

  def value_and_grad(x, w, g):
    return jax.value_and_grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1))(x, w)

  return {
    "forward": lambda x, w, g: conv(x, w),
    "input_grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
    "kernel_grad": lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
    "value_and_grad": value_and_grad,
  }


def _interleaved_medians(
  compiled: dict[str, Callable], args: tuple, rounds: int, repeats: int
) -> dict[str, float]:
  """Median seconds per call of each function, the functions alternating round by round."""
  for fn in compiled.values():
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in compiled}
  order = list(compiled)
  for _ in range(rounds):
    for name in order:
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled[name](*args))
        samples[name].append(time.perf_counter() - start)
    order.reverse()
  return {name: statistics.median(times) for name, times in samples.items()}


def _relative_difference(a, b) -> float:
  """max |a - b| / max |b| over a pytree's leaves (the largest per leaf)."""
  return max(
    float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def layer_arrays(layer: Layer, device: jax.Device) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Random input, kernel and output gradient of ``layer`` (seed 0) on ``device``."""
  rng = np.random.default_rng(0)
  x = jax.device_put(
    rng.standard_normal((layer.batch, layer.size, layer.size, layer.c_in), np.float32), device
  )
  w = jax.device_put(
    0.1 * rng.standard_normal((layer.kernel, layer.kernel, layer.c_in, layer.c_out), np.float32),
    device,
  )
  g = jax.device_put(
    rng.standard_normal((layer.batch, layer.out_size, layer.out_size, layer.c_out), np.float32),
    device,
  )
  return x, w, g


def bench_layer(layer: Layer, rounds: int, repeats: int, device: jax.Device) -> dict:
  """Times every operation of ``layer`` under both rules; GFLOP/s from the median time."""
  x, w, g = layer_arrays(layer, device)
  result = {"layer": layer._asdict(), "mflop_per_conv": layer.flops / 1e6, "operations": {}}
  for op in OPERATIONS:
    compiled = {
      mode: jax.jit(_layer_functions(layer, mode)[op]).lower(x, w, g).compile() for mode in MODES
    }
    seconds = _interleaved_medians(compiled, (x, w, g), rounds, repeats)
    flops = OPERATIONS[op] * layer.flops
    entry = {
      mode: {"median_ms": 1e3 * seconds[mode], "gflops": flops / seconds[mode] / 1e9}
      for mode in MODES
    }
    entry["speedup"] = seconds["native"] / seconds["custom"]
    entry["max_relative_difference"] = _relative_difference(
      compiled["custom"](x, w, g), compiled["native"](x, w, g)
    )
    result["operations"][op] = entry
  return result


def bench_resnet18(rounds: int, repeats: int, device: jax.Device) -> dict:
  """Loss and gradient (parameters) of ResNet-18, width 0.5, T = 1, on [1, 8, 32, 32, 3]."""
  model = models.create("resnet18", num_classes=10, time_steps=1, width=0.5)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 8, 32, 32, 3), np.float32)
  targets = training.smoothed_targets(jax.nn.one_hot(np.arange(8) % 10, 10), 10)
  params, rest, x, targets = jax.device_put((params, rest, x, targets), device)

  def grad_fn(mode):
    layers.set_conv_backward(model, mode)
    graphdef = nnx.graphdef(model)

    def loss(params, rest, x, targets):
      net = training.fresh_merge(graphdef, params, rest)
      logits = net(x, train=True)
      return (
        training.cross_entropy(jnp.sum(logits, axis=0), targets),
        nnx.state(net, nnx.Not(nnx.Param)),
      )

    return jax.value_and_grad(loss, has_aux=True)

  args = (params, rest, x, targets)
  compiled = {mode: jax.jit(grad_fn(mode)).lower(*args).compile() for mode in MODES}
  seconds = _interleaved_medians(compiled, args, rounds, repeats)
  return {
    "model": "resnet18 width=0.5 time_steps=1 input [1, 8, 32, 32, 3] float32",
    "native_ms": 1e3 * seconds["native"],
    "custom_ms": 1e3 * seconds["custom"],
    "speedup": seconds["native"] / seconds["custom"],
    "max_relative_gradient_difference": _relative_difference(
      compiled["custom"](*args)[1], compiled["native"](*args)[1]
    ),
  }


KERNEL_GRAD_LAYER = Layer("ResNet-18 3x3 s1, 64x32x32x64 -> 64", 64, 32, 64, 64, 3, 1, 1)


def _shifted(x: jax.Array, layer: Layer) -> list[jax.Array]:
  """The input as each kernel tap (a, b) reads it: KH * KW arrays the shape of the output."""
  pad = layer.padding
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = layer.out_size
  return [xp[:, a : a + out, b : b + out] for a in range(layer.kernel) for b in range(layer.kernel)]


def kernel_grad_forms(layer: Layer) -> dict[str, Callable]:
  """dL/dw of a stride-1 ``layer`` written three ways, and its forward convolution."""
  assert layer.stride == 1
  k, c_in, c_out = layer.kernel, layer.c_in, layer.c_out

  def im2col(x, w, g):
    patches = jnp.concatenate(_shifted(x, layer), axis=-1).reshape(-1, k * k * c_in)
    return (patches.T @ g.reshape(-1, c_out)).reshape(w.shape)

  def per_tap(x, w, g):
    taps = [jnp.einsum("nhwc,nhwo->co", tap, g) for tap in _shifted(x, layer)]
    return jnp.stack(taps).reshape(w.shape)

  return {
    "forward (reference)": lambda x, w, g: ops.conv2d(x, w, layer.stride, layer.padding),
    "one convolution (the library's rule)": lambda x, w, g: ops.conv2d_kernel_grad(
      x, g, w.shape, layer.stride, layer.padding
    ),
    "patches and one matrix product": im2col,
    "one matrix product per tap": per_tap,
  }


def bench_kernel_grad_forms(layer: Layer, rounds: int, repeats: int, device: jax.Device) -> dict:
  """Median time and GFLOP/s of each form of :func:`kernel_grad_forms`, interleaved."""
  x, w, g = layer_arrays(layer, device)
  compiled = {
    name: jax.jit(fn).lower(x, w, g).compile() for name, fn in kernel_grad_forms(layer).items()
  }
  seconds = _interleaved_medians(compiled, (x, w, g), rounds, repeats)
  library = compiled["one convolution (the library's rule)"](x, w, g)
  forms = {}
  for name, fn in compiled.items():
    forms[name] = {"median_ms": 1e3 * seconds[name], "gflops": layer.flops / seconds[name] / 1e9}
    if not name.startswith("forward"):
      forms[name]["max_relative_difference"] = _relative_difference(fn(x, w, g), library)
  return {"layer": layer._asdict(), "mflop_per_conv": layer.flops / 1e6, "forms": forms}


PADDING_LAYERS = tuple(
  Layer(f"ResNet-18 3x3 s1, 64x{size}x{size}x{c} -> {c}", 64, size, c, c, 3, 1, 1)
  for size, c in ((32, 64), (16, 128), (8, 256), (4, 512))
)
# Winograd F(2x2, 3x3): Y = A^T [(G w G^T) * (B^T d B)] A per 4x4 input tile d.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def valid_taps_conv(layer: Layer) -> Callable:
  """A 3x3 stride-1 'same' convolution as one matrix product per tap, each over only the
  outputs where that tap falls on the image, padded back to the output's shape and summed."""
  size, pad = layer.size, layer.padding

  def conv(x, w):
    parts = []
    for a in range(layer.kernel):
      for b in range(layer.kernel):
        da, db = a - pad, b - pad  # output (i, j) reads input (i + da, j + db)
        i0, i1 = max(0, -da), min(size, size - da)
        j0, j1 = max(0, -db), min(size, size - db)
        part = jnp.einsum("nhwc,co->nhwo", x[:, i0 + da : i1 + da, j0 + db : j1 + db], w[a, b])
        parts.append(jnp.pad(part, ((0, 0), (i0, size - i1), (j0, size - j1), (0, 0))))
    return sum(parts)

  return conv


def winograd_conv(layer: Layer) -> Callable:
  """A 3x3 stride-1 'same' convolution (even size) by Winograd F(2x2, 3x3)."""
  tiles = layer.size // 2

  def conv(x, w):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.stack([xp[:, i : i + 2 * tiles : 2] for i in range(4)], axis=2)
    d = jnp.stack([rows[:, :, :, j : j + 2 * tiles : 2] for j in range(4)], axis=4)
    v = jnp.einsum("ai,ntiwjc,bj->abntwc", _WINOGRAD_BT, d, _WINOGRAD_BT)
    u = jnp.einsum("ai,ijco,bj->abco", _WINOGRAD_G, w, _WINOGRAD_G)
    m = jnp.einsum("abntwc,abco->abntwo", v, u)
    y = jnp.einsum("pa,abntwo,qb->ntpwqo", _WINOGRAD_AT, m, _WINOGRAD_AT)
    return y.reshape(x.shape[0], layer.size, layer.size, layer.c_out)

  return conv


def bench_padding_forms(rounds: int, repeats: int, device: jax.Device) -> dict:
  """Forward and ``value_and_grad`` of each layer of :data:`PADDING_LAYERS` in the three forms."""
  from benchmarks.throughput import valid_tap_fraction

  results = {}
  for layer in PADDING_LAYERS:
    x, w, g = layer_arrays(layer, device)
    forms = {
      "one XLA convolution (the library's)": lambda x, w, layer=layer: ops.conv2d(
        x, w, layer.stride, layer.padding
      ),
      "one product per tap, padding skipped": valid_taps_conv(layer),
      "Winograd F(2x2, 3x3)": winograd_conv(layer),
    }
    compiled = {}
    for name, conv in forms.items():
      compiled[f"{name}: forward"] = (
        jax.jit(lambda x, w, g, c=conv: c(x, w)).lower(x, w, g).compile()
      )
      compiled[f"{name}: value_and_grad"] = (
        jax.jit(
          lambda x, w, g, c=conv: jax.value_and_grad(lambda x, w: jnp.vdot(c(x, w), g), (0, 1))(
            x, w
          )
        )
        .lower(x, w, g)
        .compile()
      )
    seconds = _interleaved_medians(compiled, (x, w, g), rounds, repeats)
    reference = {
      op: compiled[f"one XLA convolution (the library's): {op}"](x, w, g)
      for op in ("forward", "value_and_grad")
    }
    entry = {}
    for name, fn in compiled.items():
      op = name.rsplit(": ", 1)[1]
      flops = layer.flops * OPERATIONS[op]
      entry[name] = {
        "median_ms": 1e3 * seconds[name],
        "gflops": flops / seconds[name] / 1e9,
        "max_relative_difference": _relative_difference(fn(x, w, g), reference[op]),
      }
    results[layer.name] = {
      "layer": layer._asdict(),
      "valid_tap_fraction": valid_tap_fraction(
        layer.size, layer.kernel, layer.stride, layer.padding
      ),
      "forms": entry,
    }
  return {"rounds": rounds, "repeats": repeats, "layers": results}


# XLA_FLAGS of each option and further environment; the child program appends the library's CPU
# defaults (YNN fusion off, `xla_defaults.apply_cpu_defaults`) unless XLA_FLAGS names the same
# option or EMPF_JAX_XLA_DEFAULTS=0.
XLA_OPTIONS = {
  "library defaults (YNN fusion off)": ("", {}),
  "XLA defaults (YNN fusion on)": ("", {"EMPF_JAX_XLA_DEFAULTS": "0"}),
  "YNNPACK for convolutions": ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", {}),
  "oneDNN for convolutions": (
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    {},
  ),
  "XNNPACK for convolutions": (
    "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    {},
  ),
}
SPLIT_PARTS = (2, 4, 8)


def split_batch(layer: Layer, parts: int) -> Callable:
  """``value_and_grad`` of <conv2d(x, w), g> with the batch cut into ``parts`` convolutions."""

  def conv(x, w):
    pieces = jnp.split(x, parts)
    return jnp.concatenate([ops.conv2d(p, w, layer.stride, layer.padding) for p in pieces])

  return lambda x, w, g: jax.value_and_grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1))(x, w)


def library_fusions(compiled) -> dict[str, int]:
  """Count of each kind of library fusion (``__ynn_fusion``, ...) in a compiled program."""
  kinds = re.findall(r'"kind":"(__[a-z]+_fusion)"', compiled.as_text())
  return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def time_value_and_grad(layer: Layer, repeats: int, device: jax.Device) -> dict:
  """Median seconds of ``value_and_grad`` of ``layer`` in this process, and its fusions."""
  x, w, g = layer_arrays(layer, device)
  compiled = jax.jit(_layer_functions(layer)["value_and_grad"]).lower(x, w, g).compile()
  seconds = _interleaved_medians({"value_and_grad": compiled}, (x, w, g), 1, repeats)
  return {"seconds": seconds["value_and_grad"], "library_fusions": library_fusions(compiled)}


def bench_xla_options(rounds: int, repeats: int, device: jax.Device) -> dict:
  """Each option of :data:`XLA_OPTIONS` in a child process per round (the order flips every
  round), then the batch splits in this process; per batch size the median over rounds."""
  results = {}
  for batch in (64, 128):
    layer = KERNEL_GRAD_LAYER._replace(batch=batch)
    samples = {name: [] for name in XLA_OPTIONS}
    fusions = {}
    order = list(XLA_OPTIONS)
    for _ in range(rounds):
      for name in order:
        flags, extra = XLA_OPTIONS[name]
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
        child = subprocess.run(
          [
            sys.executable,
            "-m",
            "benchmarks.investigations.conv_cpu",
            "--child_batch",
            str(batch),
            "--repeats",
            str(repeats),
          ],
          env=env,
          capture_output=True,
          text=True,
          check=True,
        )
        entry = json.loads(child.stdout.strip().splitlines()[-1])
        samples[name].append(entry["seconds"])
        fusions[name] = entry["library_fusions"]
      order.reverse()
    x, w, g = layer_arrays(layer, device)
    split = {
      f"batch in {parts} parts": jax.jit(split_batch(layer, parts)).lower(x, w, g).compile()
      for parts in SPLIT_PARTS
    }
    split["one convolution"] = (
      jax.jit(_layer_functions(layer)["value_and_grad"]).lower(x, w, g).compile()
    )
    split_seconds = _interleaved_medians(split, (x, w, g), rounds, repeats)
    flops = 3 * layer.flops
    medians = {name: statistics.median(times) for name, times in samples.items()}
    results[str(batch)] = {
      "options": {
        name: {
          "xla_flags": XLA_OPTIONS[name][0],
          "env": XLA_OPTIONS[name][1],
          "median_ms": 1e3 * medians[name],
          "gflops": flops / medians[name] / 1e9,
          "library_fusions": fusions[name],
        }
        for name in XLA_OPTIONS
      },
      "batch_split": {
        name: {"median_ms": 1e3 * t, "gflops": flops / t / 1e9} for name, t in split_seconds.items()
      },
    }
  return {
    "layer": KERNEL_GRAD_LAYER._asdict(),
    "operation": "value_and_grad",
    "rounds": rounds,
    "repeats": repeats,
    "batches": results,
  }


def _write(result: dict, out: pathlib.Path, load_before) -> None:
  result["load_average"] = [load_before, os.getloadavg()]
  result["jax"] = jax.__version__
  result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON result file")
  parser.add_argument("--rounds", type=int, default=5, help="alternations of the two rules")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per rule per round")
  parser.add_argument(
    "--kernel_grad_forms",
    action="store_true",
    help="time only the forms of dL/dw of one layer (module docstring)",
  )
  parser.add_argument(
    "--xla_options",
    action="store_true",
    help="time one layer under XLA CPU options and batch splits (docstring)",
  )
  parser.add_argument(
    "--padding_forms",
    action="store_true",
    help="time 3x3 convolutions with and without the padding's work (docstring)",
  )
  parser.add_argument("--child_batch", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  device = jax.devices("cpu")[0]
  if args.child_batch is not None:  # one option's process of --xla_options
    layer = KERNEL_GRAD_LAYER._replace(batch=args.child_batch)
    print(json.dumps(time_value_and_grad(layer, args.repeats, device)))
    return
  load_before = os.getloadavg()
  if args.xla_options:
    result = bench_xla_options(args.rounds, args.repeats, device)
    for batch, entry in result["batches"].items():
      print(f"batch {batch}, value_and_grad of {KERNEL_GRAD_LAYER.name.split(',')[0]}:")
      for name, e in {**entry["options"], **entry["batch_split"]}.items():
        fusions = e.get("library_fusions")
        print(
          f"  {name:36s} {e['median_ms']:7.1f} ms {e['gflops']:6.1f} GFLOP/s"
          + (f"  library fusions {fusions or 0}" if fusions is not None else "")
        )
    _write(result, args.out, load_before)
    return
  if args.padding_forms:
    result = bench_padding_forms(args.rounds, args.repeats, device)
    for name, entry in result["layers"].items():
      print(f"{name} (taps on the image: {entry['valid_tap_fraction']:.2f}):")
      for form, e in entry["forms"].items():
        print(f"  {form:58s} {e['median_ms']:7.1f} ms {e['gflops']:6.1f} GFLOP/s")
    _write(result, args.out, load_before)
    return
  if args.kernel_grad_forms:
    result = bench_kernel_grad_forms(KERNEL_GRAD_LAYER, args.rounds, args.repeats, device)
    print(f"{KERNEL_GRAD_LAYER.name} ({result['mflop_per_conv']:.0f} MFLOP), dL/dw:")
    for name, entry in result["forms"].items():
      print(f"  {name:40s} {entry['median_ms']:7.1f} ms {entry['gflops']:6.1f} GFLOP/s")
    _write(result, args.out, load_before)
    return
  layers = []
  for layer in LAYERS:
    result = bench_layer(layer, args.rounds, args.repeats, device)
    layers.append(result)
    print(f"{layer.name} ({layer.flops / 1e6:.0f} MFLOP per convolution), GFLOP/s:")
    for op, entry in result["operations"].items():
      print(
        f"  {op:15s} native {entry['native']['gflops']:6.1f}   custom "
        f"{entry['custom']['gflops']:6.1f}   speedup {entry['speedup']:.2f}x"
      )
  resnet = bench_resnet18(args.rounds, args.repeats, device)
  print(
    f"{resnet['model']}, loss and gradient: native {resnet['native_ms']:.1f} ms, custom "
    f"{resnet['custom_ms']:.1f} ms, speedup {resnet['speedup']:.2f}x"
  )
  load_after = os.getloadavg()
  print(
    f"load average (1, 5, 15 min) before {load_before}, after {load_after} on {os.cpu_count()} CPUs"
  )
  report = {
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "load_average_before": load_before,
      "load_average_after": load_after,
    },
    "method": {
      "rounds": args.rounds,
      "repeats": args.repeats,
      "statistic": "median over rounds * repeats calls, rules interleaved",
    },
    "layers": layers,
    "resnet18": resnet,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  main()
