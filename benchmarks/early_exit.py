"""Latency of a deployed network at batch 1, with and without early exit, in examples per second.

Each test example is run alone (batch 1), as a latency-bound deployment would: with
:func:`empf_jax.deploy.run` (all T steps, the time scan), with
:func:`empf_jax.deploy.run_early_exit` and no rule (all T steps, the step loop) and with an exit
rule (the loop stops when the rule fires). Every variant is compiled and run on a few examples
before timing; the timed repeats
alternate the variants, so slow phases of a shared machine hit all of them alike, and the median
repeat is reported. The load average before and after is recorded with the figures.

Usage, from the repository root::

  python -m benchmarks.early_exit --bundle=FILE [--exit=softmax:0.9] [--examples=200]
      [--repeats=5]

Prints the figures and writes them to ``benchmarks/results/early_exit.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags

from empf_jax import bundle, deploy, training
from experiments import input as data_input

_BUNDLE = flags.DEFINE_string(
  "bundle",
  None,
  "Bundle written by experiments.deploy (with its FILE.json sidecar).",
  required=True,
)
_EXIT = flags.DEFINE_string("exit", "softmax:0.9", "Exit rule, as experiments.deploy --exit.")
_EXAMPLES = flags.DEFINE_integer("examples", 200, "Test examples per timed repeat.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats of every variant.", lower_bound=1)
_WARMUP = flags.DEFINE_integer(
  "warmup", 5, "Untimed examples per variant before timing.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string(
  "output",
  os.path.join(os.path.dirname(__file__), "results", "early_exit.json"),
  "Where to write the JSON figures.",
)


def test_examples(path: str, count: int) -> tuple[deploy.Deployed, str, list[np.ndarray]]:
  """The bundle, its dataset and the first ``count`` test examples as [T, 1, ...] inputs."""
  with open(path, "rb") as f:
    deployed = bundle.from_bytes(f.read())
  with open(path + ".json") as f:  # the sidecar experiments.deploy writes next to the bundle
    sidecar = json.load(f)
  dataset = sidecar["dataset"]
  test = data_input.load(
    dataset,
    "test",
    batch_size=100,
    train=False,
    seed=0,
    data_dir=sidecar.get("data_dir"),
    augment=False,
  )
  steps = deployed.arch.time_steps
  examples = []
  for x, y in test.epoch(0):
    for example in np.asarray(x)[data_input.valid_mask(y)]:
      examples.append(
        np.asarray(training.time_major(example[None], steps, static=not test.time_major))
      )
      if len(examples) == count:
        return deployed, dataset, examples
  return deployed, dataset, examples


def variants(deployed: deploy.Deployed, rule: deploy.ExitRule):
  """name -> function of one input returning (logits or prediction, steps run)."""
  steps = deployed.arch.time_steps
  return {
    "run (scan, all steps)": lambda x: (deploy.run(deployed, x), steps),
    "run_early_exit, no rule (all steps)": lambda x: _loop(deployed, x, None),
    f"run_early_exit, {rule}": lambda x: _loop(deployed, x, rule),
  }


def _loop(deployed, x, rule):
  result = deploy.run_early_exit(deployed, x, rule)
  return result.predictions, result.steps


def time_variant(function, examples: list[np.ndarray]) -> tuple[float, float]:
  """(seconds for all examples one after the other, mean steps run)."""
  steps = []
  start = time.perf_counter()
  for x in examples:
    out, ran = function(x)
    jax.block_until_ready(out)
    steps.append(int(np.asarray(ran).reshape(-1)[0]))
  return time.perf_counter() - start, float(np.mean(steps))


def main(argv: list[str]) -> None:
  del argv
  rule = deploy.ExitRule.parse(_EXIT.value)
  deployed, dataset, examples = test_examples(_BUNDLE.value, _EXAMPLES.value)
  load_before = os.getloadavg()
  functions = variants(deployed, rule)
  for function in functions.values():
    time_variant(function, examples[: _WARMUP.value])
  seconds = {name: [] for name in functions}
  mean_steps = {}
  for repeat in range(_REPEATS.value):
    names = list(functions) if repeat % 2 == 0 else list(functions)[::-1]
    for name in names:
      elapsed, mean_steps[name] = time_variant(functions[name], examples)
      seconds[name].append(elapsed)
  load_after = os.getloadavg()
  rows = {
    name: {
      "examples_per_second": len(examples) / float(np.median(values)),
      "seconds_per_repeat": values,
      "mean_steps": mean_steps[name],
    }
    for name, values in seconds.items()
  }
  for name, row in rows.items():
    print(
      f"{name}: {row['examples_per_second']:.1f} examples/s at batch 1, mean steps "
      f"{row['mean_steps']:.3f}"
    )
  result = {
    "command": "python -m benchmarks.early_exit "
    + " ".join(
      f"--{flag}={flags.FLAGS[flag].value}"
      for flag in ("bundle", "exit", "examples", "repeats", "warmup")
    ),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
    },
    "load_average_before": load_before,
    "load_average_after": load_after,
    "network": deployed.arch.name,
    "dataset": dataset,
    "time_steps": deployed.arch.time_steps,
    "batch": 1,
    "examples": len(examples),
    "exit": str(rule),
    "variants": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  from empf_jax import xla_defaults

  xla_defaults.apply_cpu_defaults()  # before the backend starts
  app.run(main)
