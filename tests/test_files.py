"""Atomic file writes: a reader finds the old file or the new one, never half of one."""

import os

import pytest

from experiments.files import atomic_file, atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "out.json"
  atomic_write(path, "first")
  atomic_write(path, b"second")
  assert path.read_bytes() == b"second"
  assert os.listdir(tmp_path / "sub") == ["out.json"]


def test_a_failed_write_leaves_the_old_file_as_it_was(tmp_path):
  path = tmp_path / "out.txt"
  atomic_write(path, "old")
  with pytest.raises(RuntimeError, match="stopped"), atomic_file(path) as f:
    f.write("half of the new")
    raise RuntimeError("stopped")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]
