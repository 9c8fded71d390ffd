"""Metrics: a JSON-lines file and TensorBoard event files in the workdir, a console progress bar.

tensorboardX is imported when a writer is made, not with this module: it imports torch whenever
torch is installed (seconds), which a run that stops at a config error should not wait for.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import tqdm

from experiments.files import atomic_file


class _NoBar:
  """Stands in for the progress bar on processes other than 0 or when progress is off."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **kwargs) -> None:
    del kwargs

  def write(self, text: str) -> None:
    print(text, flush=True)

  def close(self) -> None:
    pass


class MetricWriter:
  """Appends records to ``workdir/metrics.jsonl`` and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    if enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed by close())
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, kind: str, record: dict[str, Any]) -> None:
    """Writes one record: every scalar also goes to TensorBoard as ``kind/key`` at ``step``."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{kind}/{key}", value, record["step"])
      elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{kind}/{key}/{i + 1}", v, record["step"])
    self._tb.flush()

  def histograms(self, kind: str, values: dict[str, Any], step: int) -> None:
    """TensorBoard histograms ``kind/name`` of arrays at ``step`` (not in metrics.jsonl)."""
    if not self.enabled:
      return
    for name, array in values.items():
      self._tb.add_histogram(f"{kind}/{name}", array, step)
    self._tb.flush()

  def write_summary(self, summary: dict[str, Any]) -> None:
    """Writes ``summary.json`` and prints a short table."""
    if not self.enabled:
      return
    path = os.path.join(self.workdir, "summary.json")
    with atomic_file(path) as f:
      json.dump(summary, f, indent=2)
    self.write(
      "summary",
      {
        "step": summary["step"],
        "accuracy": summary["accuracy"],
        "accuracy_per_step": summary["accuracy_per_step"],
      },
    )
    print(format_summary(summary), flush=True)

  def progress(self, *, total: int, initial: int, enabled: bool):
    if not (self.enabled and enabled):
      return _NoBar()
    return tqdm.tqdm(
      total=total,
      initial=initial,
      unit="batch",
      dynamic_ncols=True,
      file=sys.stderr,
      mininterval=1.0,
    )

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def format_summary(summary: dict[str, Any]) -> str:
  """A plain-text summary: accuracy at each step, sizes and firing rates."""
  lines = [
    "",
    f"test accuracy at t = T: {100 * summary['accuracy']:.2f} % "
    f"({summary['examples']} examples, loss {summary['loss']:.4f})",
    "accuracy at each step: "
    + ", ".join(f"t={t + 1}: {100 * a:.2f} %" for t, a in enumerate(summary["accuracy_per_step"])),
    f"params: {summary['params_mb_paper']:.2f} MB (paper rule), "
    f"{summary['params_mb_packed']:.2f} MB packed",
  ]
  rates = summary.get("firing_rate", {})
  if rates:
    lines.append("firing rate per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
  return "\n".join(lines)
