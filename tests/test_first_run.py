"""The first run on a fresh machine: CIFAR prepared from the official archive format on first use.

The archives here are tiny ones in the official python format, written by the tests; their MD5
replaces the official one in ``cifar_archive.ARCHIVES``. Nothing here reaches the network: the
function that opens the download is replaced by one that fails (offline) or serves the archive.
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import threading
import urllib.error

import chex
import filelock
import numpy as np
import pytest
from test_experiment import ROOT, env

from experiments import input as data
from experiments.input import cifar_archive
from experiments.input.base import DataError

CIFAR10 = os.path.join(ROOT, "experiments/configs/cifar10.py")
# 2 training batches of 8 and one test batch on a width-1/4 convnet, T = 2.
TINY = [
  "--config.model.name=convnet_small",
  "--config.model.width=0.25",
  "--config.epochs=1",
  "--config.batch_size=8",
  "--config.time_steps=2",
  "--config.warmup_epochs=0",
  "--config.bn_recalibration_batches=0",
  "--config.progress=False",
  "--config.log_every_steps=1000",
]


def cifar10_archive(path, train_per_batch=4, test=8, seed=0):
  """Writes a CIFAR-10 archive in the official layout; returns its arrays (NHWC) and MD5.

  Members: ``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` (dicts with ``b"data"`` uint8
  [N, 3072] in CHW order, ``b"labels"`` a list) and ``batches.meta``.
  """
  rng = np.random.default_rng(seed)
  members, written = {}, {"train": ([], []), "test": ([], [])}
  for member, count, split in [
    (f"data_batch_{i}", train_per_batch, "train") for i in range(1, 6)
  ] + [("test_batch", test, "test")]:
    rows = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, count)]
    members[member] = {
      b"batch_label": member.encode(),
      b"labels": labels,
      b"data": rows,
      b"filenames": [b"%d.png" % i for i in range(count)],
    }
    written[split][0].append(rows.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1))
    written[split][1].append(labels)
  members["batches.meta"] = {
    b"label_names": [b"class%d" % i for i in range(10)],
    b"num_cases_per_batch": train_per_batch,
    b"num_vis": 3072,
  }
  with tarfile.open(path, "w:gz") as tar:
    for member, content in members.items():
      payload = pickle.dumps(content, protocol=2)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  arrays = {
    split: (np.concatenate(images), np.concatenate(labels).astype(np.int32))
    for split, (images, labels) in written.items()
  }
  return arrays, hashlib.md5(path.read_bytes()).hexdigest()


def expect_md5(monkeypatch, md5, name="cifar10"):
  monkeypatch.setitem(
    cifar_archive.ARCHIVES, name, dataclasses.replace(cifar_archive.ARCHIVES[name], md5=md5)
  )


OPEN_URL = cifar_archive._open_url


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  """Every test runs offline unless it serves the download itself."""

  def unreachable(url):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(cifar_archive, "_open_url", unreachable)


# The training program with the test's MD5 and without network: argv[1] the MD5, then the flags.
_CLI = """
import dataclasses, sys, urllib.error
from absl import app
from experiments import cifar
from experiments.input import cifar_archive

def unreachable(url):
  raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

cifar_archive._open_url = unreachable
cifar_archive.ARCHIVES["cifar10"] = dataclasses.replace(cifar_archive.ARCHIVES["cifar10"],
                                                        md5=sys.argv.pop(1))
app.run(cifar.main, argv=["cifar"] + sys.argv[1:], flags_parser=cifar.parse_flags)
"""


def cli(md5, *flags, timeout=300):
  return subprocess.run(
    [sys.executable, "-c", _CLI, md5, *flags],
    cwd=ROOT,
    env=env(2),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def listing(folder):
  return sorted(
    os.path.relpath(os.path.join(d, f), folder)
    for d, dirs, files in os.walk(folder)
    for f in files + dirs
  )


# --------------------------------------------------------------------------------------------------
# The training program.


@pytest.mark.timeout(300)
def test_first_run_prepares_the_archive_then_trains_and_later_runs_reuse_it(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  written, md5 = cifar10_archive(data_dir / "cifar-10-python.tar.gz")
  flags = [
    f"--workdir={tmp_path / 'run'}",
    f"--config={CIFAR10}",
    f"--config.data_dir={data_dir}",
    *TINY,
  ]
  first = cli(md5, *flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"cifar10: preparing {data_dir / 'cifar10_npy'} from" in first.stdout
  assert "test accuracy at t = T" in first.stdout
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["examples"] == 8 and summary["step"] == 2
  manifest = data_dir / "cifar10_npy" / "manifest.json"
  stamp = manifest.stat().st_mtime_ns

  second = cli(md5, *flags[:1], f"--workdir={tmp_path / 'run2'}", *flags[1:])
  assert second.returncode == 0, second.stderr[-3000:]
  assert "prepar" not in second.stdout
  assert manifest.stat().st_mtime_ns == stamp
  # The local archive stays; the folder holds the archive, the prepared data and the lock file.
  assert sorted(os.listdir(data_dir)) == [
    ".cifar10_npy.lock",
    "cifar-10-python.tar.gz",
    "cifar10_npy",
  ]
  for split, (x, y) in written.items():
    images, labels = cifar_archive.read_prepared("cifar10", split, data_dir)
    chex.assert_type([images, labels], [np.uint8, np.int32])
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


@pytest.mark.timeout(60)
def test_offline_without_data_fails_before_training_naming_folder_archive_and_offline_configs(
  tmp_path,
):
  """One line and exit 2 before anything is built: no workdir, nothing in the data folder."""
  data_dir = tmp_path / "empty"
  data_dir.mkdir()
  result = cli(
    cifar_archive.ARCHIVES["cifar10"].md5,
    f"--workdir={tmp_path / 'run'}",
    f"--config={CIFAR10}",
    f"--config.data_dir={data_dir}",
    *TINY,
    timeout=50,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: cifar10: "), result.stderr[-3000:]
  line = lines[0]
  assert f"looked in {data_dir} " in line
  assert "cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a" in line
  assert f"{data_dir}/downloads/manual/" in line
  assert "experiments/configs/digits.py, experiments/configs/fashion_mnist.py" in line
  assert os.listdir(data_dir) == []
  assert not (tmp_path / "run").exists()


@pytest.mark.timeout(60)
def test_workdir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  for workdir in (path, path / "inside"):
    result = subprocess.run(
      [sys.executable, "-m", "experiments.cifar", f"--workdir={workdir}"],
      cwd=ROOT,
      env=env(1),
      capture_output=True,
      text=True,
      timeout=50,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
      f"error: --workdir={workdir}: {path} is a file, not a folder"
    ], result.stderr
  assert path.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------------
# Preparation.


def test_manual_folder_archive_is_used_without_network(tmp_path, monkeypatch):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  written, md5 = cifar10_archive(manual / "cifar-10-python.tar.gz", train_per_batch=2, test=3)
  expect_md5(monkeypatch, md5)
  test = data.load("cifar10", "test", batch_size=4, train=False, seed=0, data_dir=str(tmp_path))
  assert test.num_examples == 3
  x, y = cifar_archive.read_prepared("cifar10", "train", tmp_path)
  np.testing.assert_array_equal(x, written["train"][0])
  np.testing.assert_array_equal(y, written["train"][1])


def test_a_silent_download_host_counts_as_offline_after_the_connect_timeout(monkeypatch):
  """No answer at all (a name lookup or connection that hangs): one try, given up after
  CONNECT_SECONDS, while the connection still hangs (the program does not wait for it)."""
  attempts, release, answered = [], threading.Event(), threading.Event()

  def hangs(url, timeout):
    attempts.append(url)
    release.wait()
    answered.set()

  monkeypatch.setattr(cifar_archive.urllib.request, "urlopen", hangs)
  monkeypatch.setattr(cifar_archive, "CONNECT_SECONDS", 0.5)
  try:
    with pytest.raises(TimeoutError, match="no answer within 0.5 s"):
      OPEN_URL(cifar_archive.ARCHIVES["cifar10"].url)
    assert not answered.is_set()  # given up while the connection still hung
  finally:
    release.set()
  assert attempts == [cifar_archive.ARCHIVES["cifar10"].url]


def test_local_archive_with_another_checksum_is_refused(tmp_path):
  cifar10_archive(tmp_path / "cifar-10-python.tar.gz")  # not the official file
  with pytest.raises(DataError) as error:
    cifar_archive.prepare("cifar10", tmp_path)
  message = str(error.value)
  assert f"{tmp_path / 'cifar-10-python.tar.gz'} has md5 " in message
  assert "not the official archive's c58f30108f718f92721af3b95e74349a" in message
  assert sorted(os.listdir(tmp_path)) == [".cifar10_npy.lock", "cifar-10-python.tar.gz"]


class _Response(io.BytesIO):
  def __init__(self, payload):
    super().__init__(payload)
    self.headers = {"Content-Length": str(len(payload))}


def test_download_is_verified_converted_and_then_deleted(tmp_path, monkeypatch):
  source = tmp_path / "served.tar.gz"
  written, md5 = cifar10_archive(source, train_per_batch=2, test=3)
  opened = []
  monkeypatch.setattr(
    cifar_archive, "_open_url", lambda url: opened.append(url) or _Response(source.read_bytes())
  )
  data_dir = tmp_path / "data"
  expect_md5(monkeypatch, "0" * 32)
  with pytest.raises(DataError, match="downloaded cifar-10-python.tar.gz has md5 .*damaged"):
    cifar_archive.prepare("cifar10", data_dir)
  assert os.listdir(data_dir) == [".cifar10_npy.lock"]
  expect_md5(monkeypatch, md5)
  assert cifar_archive.prepare("cifar10", data_dir) == data_dir / "cifar10_npy"
  assert opened == [cifar_archive.ARCHIVES["cifar10"].url] * 4  # probe and download, twice
  assert sorted(os.listdir(data_dir)) == [".cifar10_npy.lock", "cifar10_npy"]
  for split, (x, y) in written.items():
    images, labels = cifar_archive.read_prepared("cifar10", split, data_dir)
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)


# A preparation killed (SIGKILL) after writing the training images: argv[1] the data folder,
# argv[2] the archive's MD5.
_KILLED = """
import dataclasses, os, signal, sys
import numpy as np
from experiments.input import cifar_archive

cifar_archive.ARCHIVES["cifar10"] = dataclasses.replace(cifar_archive.ARCHIVES["cifar10"],
                                                        md5=sys.argv[2])
save = np.save
def save_then_die(file, array, **kwargs):
  save(file, array, **kwargs)
  if os.path.basename(file.name) == "test_images.npy":
    os.kill(os.getpid(), signal.SIGKILL)
np.save = save_then_die
cifar_archive.prepare("cifar10", sys.argv[1])
"""


@pytest.mark.timeout(120)
def test_killed_or_failed_preparation_leaves_nothing_read_as_a_dataset(tmp_path, monkeypatch):
  written, md5 = cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
  result = subprocess.run(
    [sys.executable, "-c", _KILLED, str(tmp_path), md5],
    cwd=ROOT,
    env=env(1),
    capture_output=True,
    text=True,
    timeout=100,
  )
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".cifar10_npy.tmp-")]
  assert len(leftovers) == 1
  assert "train_images.npy" in os.listdir(tmp_path / leftovers[0])
  assert not cifar_archive.is_prepared("cifar10", tmp_path)
  assert not (tmp_path / "cifar10_npy").exists()

  # A conversion that raises half-way removes its temporary folder and leaves no dataset.
  expect_md5(monkeypatch, md5)
  calls = []
  write = cifar_archive._write_synced

  def write_then_fail(path, array):
    calls.append(path.name)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    return write(path, array)

  monkeypatch.setattr(cifar_archive, "_write_synced", write_then_fail)
  with pytest.raises(OSError, match="No space left"):
    data.load("cifar10", "train", batch_size=8, train=True, seed=0, data_dir=str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [".cifar10_npy.lock", "cifar-10-python.tar.gz"]

  # The next run prepares afresh and reads exactly the archive.
  monkeypatch.setattr(cifar_archive, "_write_synced", write)
  train = data.load("cifar10", "train", batch_size=8, train=True, seed=0, data_dir=str(tmp_path))
  assert (train.num_examples, train.batches_per_epoch) == (20, 2)
  images, labels = cifar_archive.read_prepared("cifar10", "train", tmp_path)
  np.testing.assert_array_equal(images, written["train"][0])
  np.testing.assert_array_equal(labels, written["train"][1])


def test_damaged_prepared_file_is_reported(tmp_path, monkeypatch):
  _, md5 = cifar10_archive(tmp_path / "cifar-10-python.tar.gz", train_per_batch=1, test=2)
  expect_md5(monkeypatch, md5)
  folder = cifar_archive.prepare("cifar10", tmp_path)
  path = folder / "test_labels.npy"
  content = bytearray(path.read_bytes())
  content[-1] ^= 1
  path.write_bytes(bytes(content))
  with pytest.raises(DataError, match=f"{path} does not match its SHA-256 .* delete {folder}"):
    data.load("cifar10", "test", batch_size=8, train=False, seed=0, data_dir=str(tmp_path))


def test_a_second_process_waits_for_the_first_and_reuses_its_folder(tmp_path, monkeypatch):
  """Another holder of the lock (a thread here: flock locks of separate opens exclude each other
  within a process too) prepares the folder; prepare waits for it and converts nothing."""
  _, md5 = cifar10_archive(tmp_path / "cifar-10-python.tar.gz", train_per_batch=1, test=2)
  expect_md5(monkeypatch, md5)
  convert = cifar_archive.convert
  conversions = []
  monkeypatch.setattr(cifar_archive, "convert", lambda *a: conversions.append(a) or convert(*a))
  locked, finish = threading.Event(), threading.Event()

  def other_process(prepare_folder):
    with filelock.FileLock(tmp_path / ".cifar10_npy.lock"):
      locked.set()
      finish.wait(timeout=30)
      if prepare_folder:
        folder = tmp_path / ".cifar10_npy.tmp-other"
        folder.mkdir()
        convert("cifar10", tmp_path / "cifar-10-python.tar.gz", folder, md5)
        os.rename(folder, tmp_path / "cifar10_npy")

  other = threading.Thread(target=other_process, args=(True,))
  other.start()
  locked.wait(timeout=30)
  threading.Timer(1.0, finish.set).start()
  assert cifar_archive.prepare("cifar10", tmp_path) == tmp_path / "cifar10_npy"
  other.join()
  assert conversions == []

  # A holder that does not finish in time: the wait is bounded.
  (tmp_path / "cifar10_npy" / "manifest.json").unlink()
  locked.clear()
  finish.clear()
  other = threading.Thread(target=other_process, args=(False,))
  other.start()
  locked.wait(timeout=30)
  monkeypatch.setattr(cifar_archive, "WAIT_SECONDS", 0.5)
  with pytest.raises(DataError, match="waited 0.5 s for the process holding .*cifar10_npy.lock"):
    cifar_archive.prepare("cifar10", tmp_path)
  finish.set()
  other.join()


def test_prepare_cifar_command_without_tensorflow(tmp_path):
  """The explicit preparation command; offline without an archive: one line, exit 2."""
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys, urllib.error\n"
      "from absl import app\n"
      "from experiments import prepare_cifar\n"
      "from experiments.input import cifar_archive\n"
      "def unreachable(url): raise urllib.error.URLError('offline')\n"
      "cifar_archive._open_url = unreachable\n"
      "app.run(prepare_cifar.main, argv=sys.argv)",
      f"--data_dir={tmp_path}",
      "--datasets=cifar100",
    ],
    cwd=ROOT,
    env=env(1),
    capture_output=True,
    text=True,
    timeout=50,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: cifar100: "), lines
  assert "cifar-100-python.tar.gz (md5 eb9058c3a382ffc7106e4002c42a8d85" in lines[0]
  assert os.listdir(tmp_path) == []
