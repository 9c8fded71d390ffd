"""Deployment: fold a trained network into a compact inference model and run it (docs/model.md §5).

:func:`deploy` turns any network of :func:`empf_jax.models.create` into a :class:`Deployed` model:
a static :class:`Architecture` (the network's :class:`~empf_jax.models.NetOptions` and its layer
layout, :mod:`empf_jax.layout`) and a flat dict of NumPy arrays. The parts:

* :mod:`empf_jax.deploy.schema`: :class:`Architecture`, :class:`Deployed`, the arrays an
  architecture needs and its JSON description (what :mod:`empf_jax.bundle` stores);
* :mod:`empf_jax.deploy.fold`: BatchNorm, Mem-BN and weight quantisation folded into those arrays,
  sign bits packed;
* :mod:`empf_jax.deploy.runtime`: :func:`run`, an inference implementation of its own that reads
  only the arrays, and anytime inference with :func:`run_early_exit`.
* :mod:`empf_jax.deploy.export`: the same network as an ONNX graph (``to_onnx``; needs the
  optional ``onnx`` package, so it is imported on its own, not here).

The deployed model is a pytree (arrays as leaves, the architecture as static metadata), so it can be
passed to :func:`jax.jit` directly.
"""

from empf_jax.deploy.fold import (
  DeployError,
  deploy,
  fold,
  pack_binary,
  pack_ternary,
  unpack_binary,
  unpack_ternary,
)
from empf_jax.deploy.runtime import (
  EXIT_RULES,
  EarlyExit,
  ExitRule,
  Probe,
  StepRecord,
  exit_steps,
  run,
  run_early_exit,
)
from empf_jax.deploy.schema import (
  Architecture,
  Deployed,
  Params,
  architecture_from_dict,
  architecture_to_dict,
  expected_arrays,
)

__all__ = [
  "EXIT_RULES",
  "Architecture",
  "DeployError",
  "Deployed",
  "EarlyExit",
  "ExitRule",
  "Params",
  "Probe",
  "StepRecord",
  "architecture_from_dict",
  "architecture_to_dict",
  "deploy",
  "exit_steps",
  "expected_arrays",
  "fold",
  "pack_binary",
  "pack_ternary",
  "run",
  "run_early_exit",
  "unpack_binary",
  "unpack_ternary",
]
