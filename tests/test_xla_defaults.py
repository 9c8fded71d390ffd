"""The XLA CPU options empf_jax sets on import: appended when missing, never over the user's."""

import os

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

