"""XLA CPU options for programs that run empf_jax networks, applied by one explicit call.

Importing :mod:`empf_jax` changes no process state. A program (the training and deployment
programs in ``experiments/``, the benchmarks, the quickstart notebook) calls
:func:`apply_cpu_defaults` before anything runs on JAX; it appends each option of
:data:`CPU_XLA_FLAGS` to ``XLA_FLAGS`` unless ``XLA_FLAGS`` already names it or
``EMPF_JAX_XLA_DEFAULTS=0``. XLA reads ``XLA_FLAGS`` once, when the first computation starts the
backend (importing ``jax`` alone does not), so a later call changes nothing::

    from empf_jax import xla_defaults
    xla_defaults.apply_cpu_defaults()   # first, before any JAX computation
    import jax

* ``--xla_cpu_experimental_ynn_fusion_type=`` (empty): XLA's YNN fusion, the CPU default, ran
  some convolutions of these networks on one thread; without it XLA splits them over the cores.
  Measured on 2 cores: convnet28 trains 1.5-1.7x faster (345-365 against 215-224 images/s at
  batch 128, ``benchmarks/results/xla_option_ab_2026-12-07.json``), ResNet-18 +5-15 % (2026-11-28,
  ``python -m benchmarks.history --benchmark=throughput``).

The options only concern CPU compilation; accelerators keep XLA's native paths.
"""

from __future__ import annotations

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
OPT_OUT = "EMPF_JAX_XLA_DEFAULTS"


def apply_cpu_defaults() -> str:
  """Appends the missing options of :data:`CPU_XLA_FLAGS` to ``XLA_FLAGS``; returns its value."""
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get(OPT_OUT, "1") == "0":
    return flags
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags
  return flags
