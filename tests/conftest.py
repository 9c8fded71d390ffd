"""Test setup: eight fake CPU devices, so sharding is tested without accelerators."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from empf_jax import xla_defaults

xla_defaults.apply_cpu_defaults()  # what the programs do before JAX starts


@pytest.fixture(scope="session")
def digits_one_epoch(tmp_path_factory):
  """A trained workdir shared by the test files that read it or copy it: one epoch of the short
  digits run (``test_experiment.ONE_EPOCH``) on 2 devices, checkpoints 35, 40 and 44 kept.

  Tests must not change it (copy it first); writing next to it (an export) is allowed.
  """
  from test_experiment import ONE_EPOCH, run

  workdir = tmp_path_factory.mktemp("digits_one_epoch")
  result = run(str(workdir), *ONE_EPOCH)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def deploy_main(capsys):
  """``python -m experiments.deploy ARGS`` in this process (the program's own flag parsing and
  main, absl's flags reset before and after): ``run(*args)`` returns a CompletedProcess with the
  exit code and what the program printed. A subprocess would spend seconds importing JAX."""
  import subprocess

  from absl import flags

  from experiments import deploy

  def run(*args):
    capsys.readouterr()
    flags.FLAGS.unparse_flags()
    try:
      code = deploy.main(deploy.parse_flags(["experiments.deploy", *args]))
    except SystemExit as exit_:
      code = exit_.code
    finally:
      flags.FLAGS.unparse_flags()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)

  return run
