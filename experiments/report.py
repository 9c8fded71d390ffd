"""The efficiency report of a trained network (a Markdown table, a JSON record and a bar plot), and
the early-exit report of a deployed one.

:func:`write_efficiency_report` runs :func:`empf_jax.efficiency.measure` on evaluation batches and
writes three files into a folder:

* ``efficiency.md``: one row per layer in forward order (convolutions, FC layers, neurons, SECA
  gates) with its firing rate, synaptic operations (SOPs), accumulates (ACs), multiply-accumulates
  (MACs), neuron operations (NOPs) and both energy estimates, then the totals;
* ``efficiency.json``: the same rows and totals as numbers;
* ``efficiency.png``: firing rate per neuron layer and SOPs per synaptic layer.

All figures are per sample (test example), summed over the T time steps (docs/model.md §5). The two
energy columns (45 nm: 0.9 pJ per AC, 4.6 pJ per MAC):

    authors = SOPs x 0.9 pJ            (x 1/8 with 4-bit spikes)
    full    = ACs x 0.9 pJ + MACs x 4.6 pJ + neuron and SECA multiplies x 3.7 pJ
              + neuron and SECA additions x 0.9 pJ

SOPs are the operations of the layers fed by spikes, each an AC or a MAC by the layer's weights, so
``ACs + MACs`` counts every synaptic operation and SOPs are a part of it.

:func:`write_exit_report` writes ``exit_sweep.md``, ``.json`` and ``.png``: for every exit rule of
a sweep (``python -m experiments.deploy --evaluate --exit_sweep``), the accuracy, mean steps, the
fraction of examples stopping at each step and both energies per example, counted over the steps
each example ran, with the all-steps run as the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure

from empf_jax import efficiency
from empf_jax.models import SpikingNetwork
from empf_jax.training import time_major
from experiments.files import atomic_file, atomic_write
from experiments.input import valid_mask

MARKDOWN = "efficiency.md"
JSON = "efficiency.json"
PLOT = "efficiency.png"
DEFAULT_MAX_BATCHES = 4
EXIT_MARKDOWN = "exit_sweep.md"
EXIT_JSON = "exit_sweep.json"
EXIT_PLOT = "exit_sweep.png"


def plot(rows: list[efficiency.LayerRow], path: str) -> None:
  """Writes a PNG with two bar charts: firing rate per neuron layer, SOPs per synaptic layer."""
  neurons = [row for row in rows if row.kind not in ("conv", "dense", "seca")]
  synapses = [row for row in rows if row.kind in ("conv", "dense")]
  height = 1.5 + 0.25 * (len(neurons) + len(synapses))
  figure = Figure(figsize=(8, max(height, 4.0)), layout="constrained")
  top, bottom = figure.subplots(2, 1, height_ratios=[max(len(neurons), 1), max(len(synapses), 1)])
  top.barh([row.name for row in neurons], [row.rate for row in neurons], color="tab:blue")
  top.set_xlabel("firing rate (fraction of non-zero spikes)")
  top.invert_yaxis()
  bottom.barh(
    [row.name for row in synapses], [row.sops / 1e6 for row in synapses], color="tab:orange"
  )
  bottom.set_xlabel("SOPs per example (millions, all steps)")
  bottom.invert_yaxis()
  with atomic_file(path, "wb") as f:
    figure.savefig(f, format="png", dpi=120)


def network_inputs(
  batches: Iterable[tuple[np.ndarray, np.ndarray]], time_steps: int, *, max_batches: int | None
) -> Iterator[jax.Array]:
  """Time-major network inputs [T, B', ...] from evaluation batches (x, y), padding dropped.

  ``x`` is a batch of static images [B, H, W, C] (fed unchanged at each of the T steps) or of
  time-major examples [B, T, H, W, C] (moved to [T, B, ...]); examples labelled
  :data:`experiments.input.PAD_LABEL` are left out, and batches with none left are skipped.
  """
  used = 0
  for x, y in batches:
    if max_batches is not None and used >= max_batches:
      return
    if np.ndim(x) not in (4, 5):
      raise ValueError(
        f"expected images [B, H, W, C] or sequences [B, T, H, W, C]; got a batch "
        f"of shape {np.shape(x)}"
      )
    keep = valid_mask(np.asarray(y))
    if not keep.any():
      continue
    x = np.asarray(x)[keep]
    if x.ndim == 5 and x.shape[1] != time_steps:
      raise ValueError(f"the examples have {x.shape[1]} time steps; the network has T={time_steps}")
    used += 1
    yield time_major(x, time_steps, static=x.ndim == 4)


def write_efficiency_report(
  model: SpikingNetwork,
  batches: Iterable[tuple[np.ndarray, np.ndarray]],
  workdir: str,
  *,
  max_batches: int | None = DEFAULT_MAX_BATCHES,
) -> dict[str, Any]:
  """Measures ``model`` on evaluation batches and writes the report files into ``workdir``.

  Args:
    model: a network from :func:`empf_jax.models.create` (run in evaluation mode, unchanged).
    batches: evaluation batches (x, y) as an :mod:`experiments.input` pipeline yields them
      (``Batches.epoch(0)``); padding examples (label -1) are not counted.
    workdir: folder for ``efficiency.md``, ``efficiency.json`` and ``efficiency.png`` (created
      if missing; each file is replaced atomically).
    max_batches: measure at most this many batches (None: all of them). The counts are averages
      per example, so a few batches estimate them well.

  Returns:
    The content of ``efficiency.json``: ``samples``, ``time_steps``, ``spike_bits``, ``layers``
    (one dict per row, forward order, see :class:`empf_jax.efficiency.LayerRow`) and ``totals``.

  Raises:
    ValueError: no batch with a real example, or inputs of the wrong rank or number of steps.
  """
  report = efficiency.measure(
    model, network_inputs(batches, model.time_steps, max_batches=max_batches)
  )
  rows = efficiency.layer_rows(report)
  muls, adds = report.neuron_ops
  result = {
    "samples": report.samples,
    "time_steps": report.time_steps,
    "spike_bits": report.spike_bits,
    "energy_pj_per_op": {"AC": efficiency.AC_ENERGY_PJ, "MAC": efficiency.MAC_ENERGY_PJ},
    "layers": [dataclasses.asdict(row) for row in rows],
    "totals": {
      "sops": report.sops,
      "acs": report.acs,
      "macs": report.macs,
      "neuron_muls": muls,
      "neuron_adds": adds,
      "firing_rate": report.firing_rate,
      "energy_authors_pj": report.energy_authors_pj,
      "energy_full_pj": report.energy_full_pj,
    },
  }
  os.makedirs(workdir, exist_ok=True)
  atomic_write(os.path.join(workdir, MARKDOWN), efficiency.to_markdown(report, rows))
  atomic_write(os.path.join(workdir, JSON), json.dumps(result, indent=2) + "\n")
  plot(rows, os.path.join(workdir, PLOT))
  return result


def _rule_name(row: dict[str, Any]) -> str:
  return "all steps" if row["rule"] is None else f"{row['rule']}:{row['threshold']:g}"


def exit_markdown(rows: list[dict[str, Any]], title: str) -> str:
  """The sweep as a Markdown table; ``rows`` as :func:`experiments.deploy.evaluate_bundle`'s
  ``exit_sweep`` (the all-steps row has rule None)."""
  steps = len(rows[0]["stopped_per_step"])
  lines = [
    f"# Early exit: {title}",
    "",
    f"Per test example, T = {steps} steps at most; operations and energy counted over the "
    "steps each example ran (deployed runner, efficiency conventions). Rules act on the "
    "mean output c_t / t: softmax = top softmax probability >= threshold, margin = top-1 "
    "minus top-2 >= threshold.",
    "",
    "| rule | accuracy (%) | mean steps | stopping at t = 1..T (%) | SOPs (M) | "
    "energy, authors (uJ) | energy, full (uJ) |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    stopped = ", ".join(f"{100 * f:.1f}" for f in row["stopped_per_step"])
    energies = " | ".join(
      efficiency.format_value(row[key], efficiency.MICRO)
      for key in ("sops", "energy_authors_pj", "energy_full_pj")
    )
    lines.append(
      f"| {_rule_name(row)} | {100 * row['accuracy']:.2f} | {row['mean_steps']:.3f} | "
      f"{stopped} | {energies} |"
    )
  return "\n".join(lines) + "\n"


def exit_plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """Writes a PNG: accuracy against mean steps, authors' energy and full energy per example, one
  line per rule family, the all-steps run as a star."""
  figure = Figure(figsize=(13, 4), layout="constrained")
  axes = figure.subplots(1, 3, sharey=True)
  reference = next(row for row in rows if row["rule"] is None)
  columns = (
    ("mean_steps", "mean steps per example", 1.0),
    ("energy_authors_pj", "energy per example, authors (uJ)", efficiency.MICRO),
    ("energy_full_pj", "energy per example, full (uJ)", efficiency.MICRO),
  )
  for ax, (key, label, scale) in zip(axes, columns, strict=True):
    for kind, marker in (("softmax", "o-"), ("margin", "s-")):
      family = sorted((row for row in rows if row["rule"] == kind), key=lambda row: row[key])
      if family:
        ax.plot(
          [row[key] * scale for row in family],
          [100 * row["accuracy"] for row in family],
          marker,
          label=f"{kind} rule",
        )
    ax.plot(
      reference[key] * scale, 100 * reference["accuracy"], "k*", markersize=12, label="all steps"
    )
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  accuracies = [100 * row["accuracy"] for row in rows]
  # At least one point either side, so that a flat curve looks flat.
  pad = max(1.0, 0.1 * (max(accuracies) - min(accuracies)))
  axes[0].set_ylim(min(accuracies) - pad, max(accuracies) + pad)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].legend(loc="best")
  figure.suptitle(f"Early exit: {title}")
  with atomic_file(path, "wb") as f:
    figure.savefig(f, format="png", dpi=120)


def write_exit_report(rows: list[dict[str, Any]], folder: str, *, title: str) -> None:
  """Writes ``exit_sweep.md``, ``exit_sweep.json`` and ``exit_sweep.png`` into ``folder``."""
  os.makedirs(folder, exist_ok=True)
  atomic_write(os.path.join(folder, EXIT_MARKDOWN), exit_markdown(rows, title))
  atomic_write(os.path.join(folder, EXIT_JSON), json.dumps(rows, indent=2) + "\n")
  exit_plot(rows, os.path.join(folder, EXIT_PLOT), title)
