"""What the command-line programs share: exit codes and the one-line ``error:`` message."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USAGE = 2  # the run did not start: a bad flag, config value, data or workdir
EXIT_NUMERICAL = 3  # a NaN or Inf in training


def one_line(text: str) -> str:
  """A multi-line message on one line; for an embedded traceback, its first and last lines."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if any(line.startswith("Traceback") for line in lines):
    lines = [lines[0], lines[-1]]
  return " ".join(lines)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
  """Prints ``error: <message>`` on stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)
