"""experiments.interrupt: the first SIGTERM/SIGINT stops at an agreed step, a second one at once,
also while the main thread is blocked outside Python (here in the C library's sleep)."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A training loop's shape: steps until stop_signal says stop, then a wait that never ends (a
# checkpoint or collective that hangs), which only the second signal can end.
SCRIPT = """
import ctypes, sys, time
import jax
port = int(sys.argv[1])
if port:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0)
from experiments.interrupt import Interrupt
with Interrupt(synchronized=bool(port)) as interrupt:
  print("ready", flush=True)
  step = 0
  while (signum := interrupt.stop_signal(step)) is None:
    time.sleep(0.02)
    step += 1
  print(f"stop at step {step} on signal {signum}", flush=True)
  ctypes.CDLL(None).sleep(1000)
"""


def _free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _start(port):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  process = subprocess.Popen(
    [sys.executable, "-c", SCRIPT, str(port)],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline().strip() == "ready", process.stderr.read()
  return process


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
  "first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)]
)
@pytest.mark.parametrize("synchronized", [False, True], ids=["one process", "jax.distributed"])
def test_first_signal_stops_at_a_step_and_a_second_ends_the_process(first, second, synchronized):
  """One process, and the synchronized path of a multi-process run (JAX's preemption service,
  here with one process): the first signal is reported at a step; a second, sent while the main
  thread is blocked in C, ends the process with 128 + signal and one line."""
  process = _start(_free_port() if synchronized else 0)
  try:
    time.sleep(0.3)
    process.send_signal(first)
    line = process.stdout.readline()
    assert line.startswith("stop at step "), line + process.stderr.read()
    assert line.strip().endswith(f"on signal {signal.SIGTERM if synchronized else first}")
    time.sleep(0.3)
    process.send_signal(second)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + second, err[-3000:]
    assert f"stopped by a second signal ({second}): leaving now without a checkpoint" in err
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def test_handlers_and_wakeup_fd_are_restored():
  from experiments.interrupt import Interrupt

  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with Interrupt(synchronized=False) as interrupt:
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while interrupt.stop_signal(0) is None and time.time() < deadline:
      time.sleep(0.01)
    assert interrupt.stop_signal(0) == signal.SIGTERM
  assert {s: signal.getsignal(s) for s in before} == before
  assert signal.set_wakeup_fd(-1) == -1  # none was left behind
