"""The online train step with each form of the kernel gradient's input transpose, alternated.

    python -m benchmarks.investigations.batch_last_forms [--batch=64] [--rounds=7]
        [--network=resnet18]
        [--out=benchmarks/results/batch_last_forms.json]

:func:`empf_jax.ops.batch_last` turns the spike map x [N, H, W, C] into [C, H, W, N] for the
kernel-gradient convolution. The forms compared, each compiled into its own copy of the online
step (:class:`benchmarks.throughput.JaxRunner`, the step the throughput benchmark times):

* ``x I (the library's)``: a product with the identity in x's own layout, then the transpose;
* ``I x``: the identity on the other side (the library's form before), up to 64 channels;
* ``plain transpose``.

After one compiling call each, the steps run one batch each in turn for ``--rounds`` rounds (the
order flips every round), so that a shared machine's load falls on all alike; the median time
per batch is reported with each form's speed relative to the library's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import throughput

LIBRARY = "x I (the library's)"


def forms() -> dict[str, Callable]:
  import jax
  import jax.numpy as jnp

  from empf_jax import ops

  def identity_first(x):
    n, h, w, c = x.shape
    if c > 64:
      return x.transpose(3, 1, 2, 0)
    product = jax.lax.dot_general(
      jnp.eye(c, dtype=x.dtype), x.reshape(n, h * w, c), (((1,), (2,)), ((), ()))
    )  # [C, N, HW]
    return product.reshape(c, n, h, w).transpose(0, 2, 3, 1)

  return {
    LIBRARY: ops.batch_last,
    "I x, up to 64 channels": identity_first,
    "plain transpose": lambda x: x.transpose(3, 1, 2, 0),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--network", default="resnet18", choices=tuple(throughput.NETWORKS))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--width", type=float, default=1.0)
  parser.add_argument("--out", default="benchmarks/results/batch_last_forms.json")
  args = parser.parse_args(argv)
  for key in ("batch", "rounds"):
    if getattr(args, key) < 1:
      parser.error(f"--{key}={getattr(args, key)} is not allowed; allowed: an integer >= 1")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  import jax
  import numpy as np
  from flax import nnx

  from empf_jax import models, ops

  step_args = throughput.parse_args(
    [f"--network={args.network}", f"--batch={args.batch}", f"--width={args.width}"]
  )
  channels = throughput.NETWORKS[args.network]["channels"]
  model = models.create(
    args.network,
    num_classes=throughput.NUM_CLASSES,
    time_steps=4,
    width=args.width,
    in_channels=channels,
    rngs=nnx.Rngs(0),
  )
  rng = np.random.default_rng(0)
  batch = throughput.random_batch(rng, args.batch, step_args.size, channels)
  library, runners = ops.batch_last, {}
  try:
    for name, form in forms().items():
      ops.batch_last = form  # read when the step is traced, in its first call
      runners[name] = throughput.JaxRunner(model, step_args, "online", [batch])
      runners[name].run(1)
  finally:
    ops.batch_last = library
  print(f"{args.network}, online, batch {args.batch}: compiled {len(runners)} forms", flush=True)
  seconds = {name: [] for name in runners}
  order = list(runners)
  for _ in range(args.rounds):
    for name in order:
      seconds[name].append(runners[name].run(1))
    order.reverse()
  base = statistics.median(seconds[LIBRARY])
  results = {}
  for name, values in seconds.items():
    median = statistics.median(values)
    results[name] = {
      "median_seconds_per_batch": median,
      "images_per_second": args.batch / median,
      "speed_relative_to_library": base / median,
      "seconds": values,
    }
    print(
      f"  {name:24s} {1e3 * median:7.0f} ms per batch  {args.batch / median:6.2f} img/s  "
      f"{base / median:.3f}x the library's speed",
      flush=True,
    )
  record = {
    "meta": {
      "command": "python -m benchmarks.investigations.batch_last_forms "
      + " ".join(argv if argv is not None else sys.argv[1:]),
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "jax": jax.__version__,
      **throughput.cpu_description(),
      "load_average": throughput.load_average(),
      "batch": args.batch,
      "rounds": args.rounds,
      "network": args.network,
    },
    "forms": results,
  }
  throughput.write_record(args.out, record)
  return record


if __name__ == "__main__":
  main()
