"""The XLA CPU options of empf_jax: appended by the programs' one call when missing, never over
the user's; importing the library changes nothing."""

import os
import subprocess
import sys

from empf_jax import xla_defaults

FLAG = xla_defaults.CPU_XLA_FLAGS[0]


def test_missing_options_are_appended(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.delenv(xla_defaults.OPT_OUT, raising=False)
  assert xla_defaults.apply_cpu_defaults() == f"--xla_force_host_platform_device_count=2 {FLAG}"


def test_an_option_the_user_sets_is_kept(monkeypatch):
  mine = f"{FLAG.split('=')[0]}=individual_dot"
  monkeypatch.setenv("XLA_FLAGS", mine)
  monkeypatch.delenv(xla_defaults.OPT_OUT, raising=False)
  assert xla_defaults.apply_cpu_defaults() == mine


def test_opt_out_leaves_xla_flags_alone(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv(xla_defaults.OPT_OUT, "0")
  assert xla_defaults.apply_cpu_defaults() == ""
  assert "XLA_FLAGS" not in os.environ


def _run_fresh(code: str) -> str:
  """The output of ``python -c code`` in this process's environment without XLA_FLAGS and the
  opt-out: what a fresh shell has."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_defaults.OPT_OUT)}
  return subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
  ).stdout


def test_importing_the_library_leaves_xla_flags_alone():
  code = (
    "import os, empf_jax, experiments, experiments.train, experiments.cifar; "
    "print(os.environ.get('XLA_FLAGS'))"
  )
  out = _run_fresh(code)
  assert out.strip().splitlines()[-1] == "None"


def test_the_training_program_applies_the_options_before_jax_starts():
  """The program's own process (absl flags are process-wide): main() stopped where JAX starts."""
  code = (
    "import os, sys\n"
    "from experiments import cifar\n"
    "def start_distributed(jax):\n"
    "  print('XLA_FLAGS when JAX starts:', os.environ.get('XLA_FLAGS'))\n"
    "  sys.exit(0)\n"
    "cifar.start_distributed = start_distributed\n"
    "cifar.main([])\n"
  )
  out = _run_fresh(code)
  assert f"XLA_FLAGS when JAX starts: {FLAG}" in out
