"""A training config's compiled train-step memory, and the config files the benchmarks load.

Shared by ``benchmarks.ablations``, ``benchmarks.compare_modes`` and
``benchmarks.investigations.epoch_end`` (one direction of imports: they import this module, it
imports none of them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import jax

from benchmarks import memory


def load_config(path: str, overrides: list[str]):
  """``get_config([variant])`` of a config file ``FILE[:variant]`` with ``--config.key=value``
  flags applied."""
  path, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for flag in overrides:
    if not flag.startswith("--config."):
      raise ValueError(f"override {flag!r} is not allowed; allowed: --config.key=value")
    key, value = flag[len("--config.") :].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    kind = node.get_type(leaf)  # also for None fields (ml_collections placeholders)
    if kind is bool:
      node[leaf] = value.lower() in ("1", "true", "yes")
    else:
      node[leaf] = None if value == "None" else kind(value)
  return config


def _train_data(config):
  from experiments import input as data_input

  return data_input.load(
    config.dataset,
    "train",
    batch_size=config.batch_size,
    train=True,
    seed=config.seed,
    augment=False,
  )


def _step_arguments(config, data) -> dict[str, Any]:
  """The keyword arguments of :func:`benchmarks.memory.train_step_memory` for a config: its
  network (:func:`experiments.train.net_options`, without T), rule, T, batch and input."""
  from experiments import train

  network = dataclasses.asdict(train.net_options(config, data.num_classes, train.step_shape(data)))
  del network["time_steps"]
  return dict(
    network=network,
    mode=config.mode,
    time_steps=config.time_steps,
    batch=config.batch_size,
    image_shape=data.input_shape,
    static_input=not data.time_major,
  )


def dry_run(config, data=None) -> dict[str, Any]:
  """One train step of a config traced on abstract inputs (nothing compiled or allocated): the
  config's network builds and trains as :func:`mode_memory` would compile it.

  Args:
    config: a training config.
    data: its training split (or anything with ``num_classes``, ``input_shape`` and
      ``time_major``); default: loaded.

  Returns:
    ``network`` (the options) and ``loss``, the abstract loss of the step.
  """
  arguments = _step_arguments(config, data if data is not None else _train_data(config))
  step, args = memory.abstract_train_step(**arguments)
  _, output = jax.eval_shape(step, *args)
  return {"network": arguments["network"], "loss": output.loss}


def mode_memory(config) -> dict[str, Any]:
  """Compiled train-step memory of a config (its network, rule, T, batch and input shape)."""
  data = _train_data(config)
  arguments = _step_arguments(config, data)
  point = memory.train_step_memory(**arguments)
  return {
    "network": arguments["network"],
    "bytes": point["bytes"],
    "examples_per_epoch": data.batches_per_epoch * config.batch_size,
  }
