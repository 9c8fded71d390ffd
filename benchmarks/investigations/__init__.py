"""Investigations: scripts that each answered one question about the library's speed or training.

Each question and its answer are in ``BENCHMARKS.md`` ("Investigations"); rerun a script to check
the answer on other hardware (``python -m benchmarks.investigations.<name> --help``).
"""
