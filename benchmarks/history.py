"""The history of benchmark runs: superseded results, kept as data in one JSON-lines file.

    python -m benchmarks.history [--benchmark=throughput]          # one line per past run
    python -m benchmarks.history --show=FILE                       # the full record of one run
    python -m benchmarks.history --retire=FILE --by=NEWER --reason=TEXT

``BENCHMARKS.md`` shows the current figure of each benchmark; the files in ``benchmarks/results/``
are the records those figures come from. When a newer run replaces a record, ``--retire`` moves
the old record, unchanged, into ``benchmarks/results/history.jsonl`` (one JSON object per line:
the file name, the benchmark, its date and command as the record states them, the file that
replaced it, why, and the record itself) and deletes the file. Nothing of a run is lost, and the
results folder holds only what the current text cites.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HISTORY = RESULTS / "history.jsonl"


def benchmark_of(name: str) -> str:
  """The benchmark script a results file belongs to, from its name (``throughput_cpu_...``)."""
  known = sorted(
    (p.stem for p in pathlib.Path(__file__).resolve().parent.rglob("*.py")),
    key=len,
    reverse=True,
  )
  stem = pathlib.Path(name).stem
  for script in known:
    if stem == script or stem.startswith(script + "_"):
      return script
  return stem.split("_")[0]


def _first(record: Any, keys: tuple[str, ...]) -> str:
  """The first of ``keys`` found at the top of ``record`` or under its ``meta``."""
  if not isinstance(record, dict):
    return ""
  for place in (record.get("meta", {}), record):
    if isinstance(place, dict):
      for key in keys:
        if place.get(key):
          return str(place[key])
  return ""


def entry(name: str, record: Any, superseded_by: str, reason: str) -> dict[str, Any]:
  """One history line for the results file ``name`` holding ``record``."""
  return {
    "file": name,
    "benchmark": benchmark_of(name),
    "date": _first(record, ("date", "time", "started")),
    "command": _first(record, ("command",)),
    "superseded_by": superseded_by,
    "reason": reason,
    "record": record,
  }


def read(history: pathlib.Path = HISTORY) -> list[dict[str, Any]]:
  """Every line of the history, oldest retirement first."""
  if not history.exists():
    return []
  return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


def retire(
  name: str,
  superseded_by: str,
  reason: str,
  results: pathlib.Path = RESULTS,
  history: pathlib.Path | None = None,
) -> dict[str, Any]:
  """Moves ``results/name`` into the history and deletes it; returns the line written.

  Raises:
    ValueError: ``name`` is not a JSON file in ``results``, is already in the history, or
      ``superseded_by`` names no file in ``results``.
  """
  history = history or results / HISTORY.name
  path = results / name
  if path.suffix != ".json" or not path.is_file():
    raise ValueError(f"{name!r} is not a JSON file in {results}")
  if not (results / superseded_by).is_file():
    raise ValueError(f"superseded_by={superseded_by!r} names no file in {results}")
  if any(line["file"] == name for line in read(history)):
    raise ValueError(f"{name!r} is already in {history}")
  line = entry(name, json.loads(path.read_text()), superseded_by, reason)
  with history.open("a") as f:
    f.write(json.dumps(line, sort_keys=False) + "\n")
  path.unlink()
  return line


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--benchmark", default="", help="list this benchmark's runs only")
  parser.add_argument("--show", default="", help="print the full record of this file")
  parser.add_argument("--retire", default="", help="results file to move into the history")
  parser.add_argument("--by", default="", help="the results file that replaces it")
  parser.add_argument("--reason", default="", help="why it is superseded")
  args = parser.parse_args(argv)
  if args.retire and not (args.by and args.reason):
    parser.error("--retire needs --by (the newer results file) and --reason")
  return args


def main(argv: list[str] | None = None) -> int:
  args = _parse(argv)
  if args.retire:
    try:
      retire(args.retire, args.by, args.reason)
    except ValueError as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    print(f"{args.retire} -> {HISTORY.relative_to(RESULTS.parents[1])}")
    return 0
  lines = read()
  if args.show:
    matches = [line for line in lines if line["file"] == args.show]
    if not matches:
      print(f"error: {args.show!r} is not in the history", file=sys.stderr)
      return 2
    print(json.dumps(matches[0], indent=1))
    return 0
  for line in lines:
    if not args.benchmark or line["benchmark"] == args.benchmark:
      print(f"{line['date'][:16]:16}  {line['file']}  (superseded by {line['superseded_by']})")
      if line["command"]:
        print(f"{'':16}  {line['command']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
