"""Training programs for empf_jax: configs, input pipelines, the training driver, checkpoints.

Importing this package sets one XLA CPU option before JAX starts its backend, unless
``XLA_FLAGS`` already sets it or ``EMPF_JAX_XLA_DEFAULTS=0``:
``--xla_cpu_experimental_ynn_fusion_type=`` (empty) turns off XLA's YNN fusion on CPU, which ran
some convolutions on one thread; measured on 2 cores it trains convnet28 on Fashion-MNIST 1.55x
faster (186 against 120 images/s at batch 128; BENCHMARKS.md). The option only concerns CPU
compilation; accelerators keep XLA's native paths.
"""

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def _apply_cpu_xla_defaults() -> None:
  if os.environ.get("EMPF_JAX_XLA_DEFAULTS", "1") == "0":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_XLA_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags


_apply_cpu_xla_defaults()
