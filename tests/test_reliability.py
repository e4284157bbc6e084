"""Reliability faults, each reproduced and then resumed: the workdir lock, a failed resume
that must not rewrite config.json, damaged newest checkpoints (fallback or stop), the
bounded non-finite skip, and the progress bar off a terminal.

After each fault the original config resumes and reproduces an uninterrupted run's
per-step losses bitwise (`REF`: 8 steps, checkpoints at 2, 4, 6, 8). The train step is
tests/test_train.tiny_config()'s (checkpoint_every is no part of it), so the session's
compilation cache already holds it; the module's runs share one set-up
(`shared_compilations`, tests/conftest.py)."""
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import test_fault_tolerance, test_train
from vlp_jax import sharding as vlp_sharding
from vlp_jax import errors
from vlp_jax.train import checkpoint_health, loop, nonfinite, workdir_lock

TOTAL, EVERY = 8, 2

pytestmark = pytest.mark.usefixtures("shared_compilations")


def config(**kw):
  c = test_train.tiny_config(total_steps=TOTAL)
  c.checkpoint_every = EVERY
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """An uninterrupted 8-step run."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  loop.run(config(), workdir)
  return workdir


def stopped_at_6(ref, tmp_path):
  """A copy of `ref` as a run killed after its step-6 checkpoint (rows past 6 stay in
  metrics.jsonl: the resume drops them)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  return workdir


def assert_resumes_to_ref(workdir, ref, from_step=6, cfg=None):
  loop.run(cfg or config(), workdir)
  got, want = test_train.losses(workdir), test_train.losses(ref)
  assert got == want  # Bitwise: the same floats, every step once.
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())[-1] == TOTAL
  del from_step


# 1. The workdir lock.

def _sleeper():
  return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
    json.dump(record, f)


def test_lock_held_by_a_live_process_refuses_and_a_dead_one_is_taken_over(ref, tmp_path):
  workdir = stopped_at_6(ref, tmp_path)
  holder = _sleeper()
  try:
    ticks = workdir_lock._proc_start_ticks(holder.pid)  # pylint: disable=protected-access
    _write_lock(workdir, host=socket.gethostname(), pid=holder.pid,
                proc_start_ticks=ticks and ticks[1], start_time="2026-12-01T04:00:00",
                command="main.py --workdir=x", token="other")
    before = sorted(os.listdir(workdir))
    with pytest.raises(errors.WorkdirLockedError,
                       match=rf"host {socket.gethostname()}, pid {holder.pid}, started "
                       r"2026-12-01T04:00:00"):
      loop.run(config(), workdir)
    assert sorted(os.listdir(workdir)) == before  # Refused before touching anything.
  finally:
    holder.kill()
    holder.wait()
  assert_resumes_to_ref(workdir, ref)  # The dead holder's lock does not block.
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # Released.


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
  workdir = str(tmp_path)
  _write_lock(workdir, host="elsewhere", pid=1, start_time="t0", token="other")
  with pytest.raises(errors.WorkdirLockedError, match="host elsewhere, pid 1"):
    workdir_lock.WorkdirLock(workdir, stale_after_s=60).acquire()
  old = time.time() - 61
  os.utime(os.path.join(workdir, workdir_lock.LOCK_NAME), (old, old))
  lock = workdir_lock.WorkdirLock(workdir, stale_after_s=60).acquire()
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
    assert json.load(f)["pid"] == os.getpid()
  # The holder's heartbeat keeps its lock fresh, so a second taker is refused.
  with pytest.raises(errors.WorkdirLockedError, match=f"pid {os.getpid()}"):
    workdir_lock.WorkdirLock(workdir, stale_after_s=60).acquire()
  lock.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_heartbeat_refreshes_the_lock(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=0.4).acquire()
  path = os.path.join(str(tmp_path), workdir_lock.LOCK_NAME)
  os.utime(path, (0, 0))
  time.sleep(0.5)
  assert time.time() - os.path.getmtime(path) < 0.4
  lock.release()


def test_a_zombie_or_recycled_pid_does_not_hold_the_lock():
  done = subprocess.Popen([sys.executable, "-c", "pass"])
  while workdir_lock._proc_start_ticks(done.pid)[0] != "Z":  # pylint: disable=protected-access
    time.sleep(0.01)
  here = socket.gethostname()
  assert workdir_lock.stale_reason({"host": here, "pid": done.pid}, 0, 600)
  done.wait()
  assert workdir_lock.stale_reason({"host": here, "pid": done.pid}, 0, 600)
  ticks = workdir_lock._proc_start_ticks(os.getpid())[1]  # pylint: disable=protected-access
  assert workdir_lock.stale_reason({"host": here, "pid": os.getpid(),
                                    "proc_start_ticks": ticks}, 0, 600) is None
  assert workdir_lock.stale_reason({"host": here, "pid": os.getpid(),
                                    "proc_start_ticks": ticks + 1}, 0, 600)


def test_evaluation_takes_no_lock_and_a_mistyped_workdir_creates_nothing(ref, tmp_path):
  missing = str(tmp_path / "typo")
  c = config()
  c.evals = {"zeroshot": test_train.tiny_config(evals=True).evals.zeroshot}
  with pytest.raises(errors.WorkdirError, match="does not exist"):
    loop.evaluate(c, missing)
  assert not os.path.exists(missing)
  lock = workdir_lock.WorkdirLock(ref).acquire()  # A training run holds the lock.
  try:
    before = sorted(os.listdir(os.path.join(ref, "checkpoints")))
    assert "eval/zeroshot/top1" in loop.evaluate(c, ref)
    assert sorted(os.listdir(os.path.join(ref, "checkpoints"))) == before
  finally:
    lock.release()


# 2. A failed resume leaves config.json as it was.

def test_failed_resume_does_not_rewrite_config_json(ref, tmp_path):
  workdir = stopped_at_6(ref, tmp_path)
  path = os.path.join(workdir, "config.json")
  with open(path, "rb") as f:
    saved = f.read()
  wider = config()
  wider.model.text.width = 48
  with pytest.raises(errors.CheckpointError, match="does not match the model"):
    loop.run(wider, workdir, allow_config_change=True)
  with open(path, "rb") as f:
    assert f.read() == saved
  assert_resumes_to_ref(workdir, ref)  # The original command is still accepted.


# 4. A damaged newest checkpoint.

def _rm(*patterns):
  def damage(step_dir):
    paths = [p for pat in patterns for p in glob.glob(os.path.join(step_dir, pat))]
    assert paths, patterns
    for p in paths:
      os.remove(p)
  return damage


def _truncate_chunks(step_dir):
  for p in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    with open(p, "r+b") as f:
      f.truncate(10)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGES = {
    "state_metadata": (_rm("state/_METADATA"), "'state/_METADATA' is missing"),
    "data_json": (_rm("data/process_0-of-1.json"), "data-iterator position"),
    "ocdbt_chunks": (_rm("state/ocdbt.process_0/d/*"), "reading it failed"),
    "truncated_chunks": (_truncate_chunks, "reading it failed"),
    "empty_step_folder": (_empty, "the step directory is empty"),
}


@pytest.mark.parametrize("kind", [
    "state_metadata", "empty_step_folder",
    pytest.param("ocdbt_chunks", marks=pytest.mark.slow),
    pytest.param("data_json", marks=pytest.mark.slow),
    pytest.param("truncated_chunks", marks=pytest.mark.slow)])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(
    ref, tmp_path, kind, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  damage, what = DAMAGES[kind]
  damage(os.path.join(workdir, "checkpoints", "8"))
  with pytest.raises(errors.CheckpointError, match=rf"step 8: .*{what}.* "
                     r"config.damaged_checkpoint='fall_back' to resume from step 6"):
    loop.run(config(damaged_checkpoint="stop"), workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # Nothing moved.
  assert_resumes_to_ref(workdir, ref)
  assert any("Resumed from step 6 instead of the newest checkpoint step 8" in r.message
             for r in caplog.records)
  moved = os.path.join(workdir, checkpoint_health.DAMAGED_DIR, "8")
  assert os.path.isdir(moved)  # Kept, out of Orbax's sight; step 8 saved anew.


@pytest.mark.slow  # ~6 s; the 20-seed fault injection covers fallbacks too.
def test_two_damaged_steps_are_both_named_and_skipped(ref, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  _rm("state/_METADATA")(os.path.join(workdir, "checkpoints", "8"))
  _empty(os.path.join(workdir, "checkpoints", "6"))
  loop.run(config(total_steps=TOTAL), workdir)
  assert test_train.losses(workdir) == test_train.losses(ref)
  text = " ".join(r.message for r in caplog.records)
  assert "Resumed from step 4 instead of the newest checkpoint step 8" in text
  assert "step 6: the step directory is empty" in text
  assert sorted(os.listdir(os.path.join(workdir, checkpoint_health.DAMAGED_DIR))) == [
      "6", "8"]


def test_a_checkpoint_of_another_model_is_an_error_not_a_fallback(ref, tmp_path):
  workdir = stopped_at_6(ref, tmp_path)
  wider = config()
  wider.model.text.width = 48
  with pytest.raises(errors.CheckpointError, match="step 6 .* does not match"):
    loop.run(wider, workdir, allow_config_change=True)
  assert not os.path.exists(os.path.join(workdir, checkpoint_health.DAMAGED_DIR))


def test_health_check_names_what_is_missing(ref):
  step_dir = os.path.join(ref, "checkpoints", "8")
  assert checkpoint_health.problems(step_dir, with_data=True) == []
  assert checkpoint_health.problems(step_dir + "0", with_data=True) == [
      "the step directory is gone"]


# 6. A bounded non-finite skip.

def test_skip_halts_after_too_many_consecutive_nonfinite_steps(ref, tmp_path,
                                                               monkeypatch):
  calls = {"n": 0}
  original = vlp_sharding.make_global_batch

  def poisoned_from_6(batch, mesh, rules):
    calls["n"] += 1
    batch = test_fault_tolerance.poison(batch) if calls["n"] >= 6 else batch
    return original(batch, mesh, rules)
  monkeypatch.setattr(vlp_sharding, "make_global_batch", poisoned_from_6)
  # Checkpoints every 4 steps: none is due while the skipped steps 6..8 run. The probe
  # config's train step is test_fault_tolerance's (compiled once per session).
  probe = lambda: test_fault_tolerance.probe_config(  # pylint: disable=g-long-lambda
      total_steps=TOTAL, nonfinite="skip", nonfinite_max_consecutive=2,
      checkpoint_every=4)
  workdir = str(tmp_path)
  with pytest.raises(nonfinite.NonFiniteError,
                     match=r"Steps 6\.\.8: 3 consecutive .*nonfinite_max_consecutive=2"):
    loop.run(probe(), workdir)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]  # Nothing bad saved.
  monkeypatch.setattr(vlp_sharding, "make_global_batch", original)  # Data fixed.
  loop.run(probe(), workdir)
  got = [(s, loss) for s, loss in test_train.losses(workdir)]
  assert got == test_train.losses(ref)  # The probe objective adds exactly 0.


def test_consecutive_count_carries_over_a_resume():
  ok, bad = np.zeros(4, bool), np.array([True, True, False, False])
  m = nonfinite.Monitor("skip", ["a", "b"], skipped=2, max_consecutive=2, consecutive=2)
  m.add(9, bad)
  with pytest.raises(nonfinite.NonFiniteError, match=r"Steps 7\.\.9: 3 consecutive"):
    m.check()
  m = nonfinite.Monitor("skip", ["a", "b"], max_consecutive=2, consecutive=2)
  m.add(9, ok)
  m.add(10, bad)
  m.add(11, bad)
  m.check()
  assert (m.skipped, m.consecutive) == (2, 2)
  m = nonfinite.Monitor("skip", ["a", "b"], max_consecutive=0)  # 0: no bound.
  for s in range(50):
    m.add(s, bad)
  m.check()
  assert m.skipped == 50


# 8. Logs that people can read.

class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_only_on_a_terminal():
  for stream, shown in ((io.StringIO(), False), (_Tty(), True)):
    bar = loop._progress_bar(0, 100, True, stream)  # pylint: disable=protected-access
    for _ in range(100):
      bar.update(1)
    bar.close()
    assert ("\r" in stream.getvalue()) == shown
  quiet = _Tty()
  bar = loop._progress_bar(0, 10, False, quiet)  # pylint: disable=protected-access
  bar.update(10)
  bar.close()
  assert quiet.getvalue() == ""  # Not the chief process.
