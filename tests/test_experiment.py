"""The training program end to end: real training on digits, resumption, multi-process, safety.

Each test runs ``python -m experiments.cifar`` in a subprocess, as a user would.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "experiments/configs/digits.py"
# A short digits run: 2 epochs of 44 batches, checkpoints every 5 batches, a narrow network.
SHORT = [
  "--config.epochs=2",
  "--config.checkpoint_every_steps=5",
  "--config.model.width=0.25",
  "--config.progress=False",
  "--config.log_every_steps=1000",
]


# Compiled programs are shared between the subprocesses of one test session (each run would
# otherwise spend most of its time compiling the same train and eval steps).
COMPILATION_CACHE = tempfile.mkdtemp(prefix="empf_jax_test_cache_")


def env(devices=2, **extra):
  e = dict(os.environ)
  e["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONUNBUFFERED"] = "1"
  e.update(extra)
  return e


def command(workdir, *flags, config=DIGITS):
  return [
    sys.executable,
    "-m",
    "experiments.cifar",
    f"--workdir={workdir}",
    f"--config={config}",
    *flags,
  ]


def run(workdir, *flags, devices=2, timeout=300, config=DIGITS):
  return subprocess.run(
    command(workdir, *flags, config=config),
    cwd=ROOT,
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture
def spawn():
  """``spawn(command, **popen_args)``: a started process that is killed (if still running) when
  the test ends, passed or failed, so that no training process outlives its test."""
  started = []

  def start(args, **kwargs):
    process = subprocess.Popen(args, **kwargs)
    started.append(process)
    return process

  yield start
  for process in started:
    if process.poll() is None:
      process.kill()
      process.wait()


def free_port():
  """A TCP port that is free on this machine now (the system's choice for port 0)."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def final_params(workdir):
  """Step and flattened parameters and statistics of the newest checkpoint (as numpy)."""
  step = max(checkpoint_steps(workdir))
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  state = checkpointer.restore(
    path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  )
  leaves = jax.tree.leaves({"params": state["params"], "rest": state["rest"]})
  return step, np.concatenate([np.ravel(leaf) for leaf in leaves])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = run(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.timeout(180)
def test_digits_trains_to_97_percent(tmp_path):
  """Real training: online rule, binary weights, T=4 on scikit-learn's digits."""
  result = run(str(tmp_path), "--config.progress=False", timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["accuracy"] >= 0.97, summary["accuracy_per_step"]
  assert summary["examples"] == 360
  assert len(summary["accuracy_per_step"]) == 4
  assert summary["params_mb_packed"] < summary["params_mb_paper"]
  assert set(summary["firing_rate"]) == {"unit1/neuron", "unit2/neuron", "unit3/neuron"}
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"train", "eval", "summary"} <= {r["kind"] for r in records}
  assert any(
    name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard")
  )
  # The efficiency report is written at the end of every run.
  for name in ("efficiency.md", "efficiency.json", "efficiency.png"):
    assert (tmp_path / name).exists(), name
  assert 0 < summary["energy_pj_per_example"]["authors"] <= summary["energy_pj_per_example"]["full"]


@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, uninterrupted, spawn):
  workdir = str(tmp_path)
  process = spawn(
    command(workdir, *SHORT),
    cwd=ROOT,
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 240
  while time.time() < deadline and not any(s >= 15 for s in checkpoint_steps(workdir)):
    time.sleep(0.05)
  process.kill()
  process.wait()
  killed_at = max(checkpoint_steps(workdir))
  assert 15 <= killed_at < 88, "the kill must land before the end of training"
  result = run(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from step" in result.stdout
  step_a, params_a = final_params(uninterrupted)
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == 88
  np.testing.assert_array_equal(params_a, params_b)


@pytest.mark.timeout(400)
def test_sigterm_checkpoints_then_resume_matches_uninterrupted(tmp_path, uninterrupted, spawn):
  workdir = str(tmp_path)
  process = spawn(
    command(workdir, *SHORT),
    cwd=ROOT,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 240
  while time.time() < deadline and not any(s >= 6 for s in checkpoint_steps(workdir)):
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 143, output[-3000:]
  match = [line for line in output.splitlines() if "stopped by signal" in line]
  assert match, output[-3000:]
  stopped_at = int(match[0].split("at step ")[1].split(";")[0])
  assert stopped_at in checkpoint_steps(workdir)
  result = run(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(final_params(uninterrupted)[1], final_params(workdir)[1])


# random_step (the online rule's single-update variant) in the slow suite: the default suite's time.
@pytest.fixture(
  scope="module", params=["online", pytest.param("random_step", marks=pytest.mark.slow), "bptt"]
)
def float_one_device(request, tmp_path_factory):
  """(rule, workdir) of one epoch of the short float-weight digits run on one device."""
  workdir = str(tmp_path_factory.mktemp(f"float_one_device_{request.param}"))
  result = run(
    workdir, *ONE_EPOCH, f"--config.mode={request.param}", devices=1, config=DIGITS + ":float"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return request.param, workdir


@pytest.mark.timeout(300)
def test_two_devices_train_like_one_with_every_default(tmp_path, float_one_device):
  """Each rule with every default of the digits config (BatchNorm re-estimation and its check on
  other batches, evaluation at the epoch end, checkpoints in the middle of the epoch) on 2 host
  devices ends with the parameters of a 1-device run.

  Float weights and one epoch, with a tolerance of 1e-3: the devices sum gradients and BatchNorm
  statistics in another order, so step 1 differs by ~2e-7 (float32 rounding) and the difference
  grows with training: ~1e-4 after this epoch (learning-rate warmup), then ~10x every 5 steps at
  the full learning rate (0.27 at step 60). Binary weights cannot be compared this way: latent
  weights start within 1e-3 of 0, and one epoch of rounding differences flips 5-10 % of their
  signs (361 of 3802 online); the binary defaults on 2 devices run in the tests above.
  """
  mode, single = float_one_device
  workdir = str(tmp_path)
  result = run(workdir, *ONE_EPOCH, f"--config.mode={mode}", devices=2, config=DIGITS + ":float")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "re-estimated from 22 batches" in result.stdout, result.stdout[-2000:]
  assert checkpoint_steps(workdir) == [35, 40, 44]  # two in the middle of the epoch
  step_single, params_single = final_params(single)
  step_two, params_two = final_params(workdir)
  assert step_single == step_two == 44
  np.testing.assert_allclose(params_two, params_single, rtol=0, atol=1e-3)


def two_processes(spawn, workdir, flags, port):
  return [
    spawn(
      command(
        workdir,
        *flags,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=ROOT,
      env=env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]


ONE_EPOCH = SHORT + ["--config.epochs=1"]


def assert_same_epoch(multi, single):
  """A multi-process run of ONE_EPOCH ended with the parameters of the one-process run: the same
  devices partition the same global batch, so only the sums' transport differs."""
  step_single, params_single = final_params(single)
  step_multi, params_multi = final_params(multi)
  assert step_single == step_multi == 44
  np.testing.assert_allclose(params_multi, params_single, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """One epoch of the short run in one process with four devices."""
  workdir = str(tmp_path_factory.mktemp("four_devices"))
  result = run(workdir, *ONE_EPOCH, devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


# The default suite has the same comparison after a preemption (the next test: a two-process run
# stopped and resumed ends with the parameters of the one-process run).
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_match_one_process(tmp_path, four_devices, spawn):
  """Two processes joined by jax.distributed (2 CPU devices each, gloo) train like one process
  with four devices and the same global batch."""
  single = four_devices
  port = free_port()
  multi = str(tmp_path / "multi")
  processes = two_processes(spawn, multi, ONE_EPOCH, port)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
  assert_same_epoch(multi, single)


@pytest.mark.slow  # the default suite keeps kill -9 as its one two-process stop-and-resume run
@pytest.mark.timeout(600)
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, four_devices, spawn):
  """A preemption notice that reaches one process only: both save the same step and exit 143,
  and the resumed two-process run ends with the parameters of an uninterrupted run."""
  multi = str(tmp_path / "multi")
  processes = two_processes(spawn, multi, ONE_EPOCH, free_port())
  deadline = time.time() + 300
  while time.time() < deadline and not any(s >= 5 for s in checkpoint_steps(multi)):
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  stopped = []
  for p, output in zip(processes, outputs):
    assert p.returncode == 143, output[-3000:]
    match = [line for line in output.splitlines() if "stopped by signal 15" in line]
    assert match, output[-3000:]
    stopped.append(int(match[0].split("at step ")[1].split(";")[0]))
  assert stopped[0] == stopped[1] < 44
  assert max(checkpoint_steps(multi)) == stopped[0]
  processes = two_processes(spawn, multi, ONE_EPOCH, free_port())
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
    assert f"resuming from step {stopped[0]}" in output, output[-3000:]
  assert_same_epoch(multi, four_devices)


@pytest.mark.timeout(600)
def test_kill_9_of_one_process_ends_the_other_then_both_resume(tmp_path, four_devices, spawn):
  """A process killed outright: the survivor's watcher ends it, exit 4 with the line that names
  the lost process and what to do (JAX alone would abort it with SIGABRT after its heartbeat);
  restarting both resumes from the newest checkpoint and ends with the parameters of an
  uninterrupted run."""
  multi = str(tmp_path / "multi")
  lost = ["--lost_process_timeout=10"]
  processes = two_processes(spawn, multi, ONE_EPOCH + lost, free_port())
  deadline = time.time() + 300
  while time.time() < deadline and not any(s >= 10 for s in checkpoint_steps(multi)):
    time.sleep(0.05)
  processes[1].kill()
  output = processes[0].communicate(timeout=120)[0]
  assert processes[0].returncode == 4, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "process 1 of 2 lost" in errors[0], output[-3000:]
  assert f"restart all 2 processes with the same --workdir={multi}" in errors[0]
  assert "Traceback" not in output, output[-3000:]
  newest = max(checkpoint_steps(multi))
  assert newest < 44, "the kill must land before the end of the epoch"
  processes = two_processes(spawn, multi, ONE_EPOCH + lost, free_port())
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
    assert "resuming from step" in output, output[-3000:]
  assert_same_epoch(multi, four_devices)


SLURM = {
  "SLURM_JOB_ID": "7",
  "SLURM_STEP_NODELIST": "localhost",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "0",
  "SLURM_LOCALID": "0",
}


def test_cluster_launcher_reads_srun_and_mpirun_environments():
  from experiments import cli

  assert cli.cluster_launcher(SLURM) == "SLURM (srun)"
  assert cli.cluster_launcher({**SLURM, "SLURM_NTASKS": "1"}) is None  # srun -n 1, sbatch
  assert (
    cli.cluster_launcher({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}) is None
  )  # an sbatch shell outside any srun step
  mpi = {
    "OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5000",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "3",
  }
  assert cli.cluster_launcher(mpi) == "Open MPI (mpirun)"
  assert cli.cluster_launcher({}) is None
  with pytest.raises(SystemExit):
    cli.cluster_launcher({**SLURM, "SLURM_NTASKS": "two"})


def _slurm_job_id_with_free_port():
  """A SLURM job id whose coordinator port (JAX: 61440 + id mod 4096) is free here."""
  for port in range(61440 + os.getpid() % 2000, 65536):
    with socket.socket() as probe:
      try:
        probe.bind(("127.0.0.1", port))
      except OSError:
        continue
    return str(port - 61440 + 4096 * 3)
  raise RuntimeError("no free port in 61440-65535")


@pytest.mark.slow  # the default suite reads the launcher environment in test_cluster_launcher_*
@pytest.mark.timeout(400)
def test_srun_launch_forms_one_run_without_flags(tmp_path, four_devices, spawn):
  """Two processes started as srun starts them (SLURM's variables, no multi-host flags) join
  each other and train like one process with four devices."""
  multi = str(tmp_path / "multi")
  job = _slurm_job_id_with_free_port()
  processes = [
    spawn(
      command(multi, *ONE_EPOCH),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env(2, **{**SLURM, "SLURM_JOB_ID": job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}),
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for i, (p, output) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, output[-3000:]
    assert f"process {i} of 2 (started by SLURM (srun))" in output, output[-3000:]
  assert_same_epoch(multi, four_devices)


def test_workdir_with_another_config_is_refused(tmp_path, uninterrupted):
  result = run(uninterrupted, *SHORT, "--config.learning_rate=0.5")
  assert result.returncode == 2
  assert "different config" in result.stderr and "--allow_config_change" in result.stderr
  # Harmless keys (logging, checkpoint interval) do not count as a different config.
  result = run(uninterrupted, *SHORT[:-1], "--config.log_every_steps=7", "--eval_only")
  assert result.returncode == 0, result.stderr[-3000:]


def test_eval_only_evaluates_the_latest_checkpoint(uninterrupted):
  result = run(uninterrupted, *SHORT, "--eval_only")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming from step 88" in result.stdout
  assert "accuracy at each step" in result.stdout


def test_eval_only_without_checkpoint_is_a_clear_error(tmp_path):
  result = run(str(tmp_path), *SHORT, "--eval_only")
  assert result.returncode == 2
  assert "no checkpoint" in result.stderr
  assert "Traceback" not in result.stderr
