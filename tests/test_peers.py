"""experiments.peers: how a multi-process run finds a lost process, on an in-memory key-value
store with the distributed client's methods (the real store runs in tests/test_experiment.py)."""

import threading
import time

import pytest

from experiments import peers

# give_up ends its thread with SystemExit here, where the program would leave with os._exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Store:
  """The methods of jax.distributed's client that PeerWatch uses, shared by all 'processes'."""

  def __init__(self):
    self.values = {}
    self.lock = threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      assert allow_overwrite or key not in self.values
      self.values[key] = value

  def key_value_try_get(self, key):
    with self.lock:
      if key not in self.values:
        raise KeyError(f"NOT_FOUND: {key}")
      return self.values[key]


@pytest.fixture
def exits(monkeypatch):
  """The exit codes PeerWatch.give_up asked for, by thread name (instead of leaving pytest)."""
  codes = {}

  def exit_(code):
    codes[threading.current_thread().name] = code
    raise SystemExit(code)

  monkeypatch.setattr(peers.os, "_exit", exit_)
  return codes


def watch(store, index, count=3, timeout_s=0.4):
  w = peers.PeerWatch(store, index, count, timeout_s, "/runs/a", beat_s=0.05)
  w._thread.name = f"watch-{index}"
  return w


def test_a_silent_process_is_reported_by_its_watcher_and_every_survivor_leaves(exits, capsys):
  store = Store()
  watches = [watch(store, i) for i in range(3)]
  for w in watches:
    w.__enter__()
  time.sleep(0.3)
  watches[1]._stop.set()  # process 1 stops beating (frozen)
  for w in (watches[0], watches[2]):
    w._thread.join(timeout=5)
  assert exits == {"watch-0": peers.EXIT_PEER_LOST, "watch-2": peers.EXIT_PEER_LOST}
  assert store.values["empf_jax/lost"] == "1:no sign of life for 0.4 s"  # by its watcher, 0
  lines = [line for line in capsys.readouterr().err.splitlines() if line]
  assert (
    lines
    == [
      "error: process 1 of 3 lost (no sign of life for 0.4 s); this run cannot continue without "
      "it: restart all 3 processes with the same --workdir=/runs/a to resume from its newest "
      "checkpoint"
    ]
    * 2
  )


def test_processes_that_leave_on_their_own_are_not_lost(exits):
  store = Store()
  watches = [watch(store, i, count=2) for i in range(2)]
  for w in watches:
    w.__enter__()
  watches[1].__exit__(None, None, None)  # finished, or stopped by a signal
  time.sleep(1.0)  # more than the timeout
  assert not exits and watches[0]._thread.is_alive()
  assert watches[0].lost(wait_s=0.2) == []
  watches[0].__exit__(None, None, None)
  assert store.values["empf_jax/beat/0"] == store.values["empf_jax/beat/1"] == "done"


def test_lost_names_the_processes_whose_beat_stands_still(exits):
  store = Store()
  watches = [watch(store, i, count=4, timeout_s=60) for i in range(4)]
  for w in watches:
    w.__enter__()
  for i in (1, 3):
    watches[i]._stop.set()
    watches[i]._thread.join()
  assert watches[0].lost(wait_s=0.3) == [1, 3]
  assert watches[2].lost(wait_s=0.3) == [1, 3]
  with pytest.raises(SystemExit):
    watches[0].give_up([1, 3], "a collective failed: reset", report=True)
  assert store.values["empf_jax/lost"] == "1,3:a collective failed: reset"
  for w in (watches[0], watches[2]):  # they read the report
    w._thread.join(timeout=5)
  assert exits["watch-2"] == peers.EXIT_PEER_LOST
  assert not any(w._thread.is_alive() for w in watches)
