"""A checkpoint that cannot be written (permission, disk full, quota) stops the run within
seconds with `errors.SaveError` naming the directory, the step and the cause (Orbax used
to stall 300 s and die with an unrelated TimeoutError); the earlier checkpoints stay
restorable; the start-up check test-writes where checkpoints go."""
import errno
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from etils.epath import backend as epath_backend

from tests import test_train
from vlp_jax import errors
from vlp_jax.train import checkpoint, loop, metric_writer as metrics_lib, startup_checks
from vlp_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP4 = os.path.join("checkpoints", "4.orbax-checkpoint-tmp")  # Step 4 being written.

# tiny_config()'s set-up, shared with the session's other loop tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_compilations")


def _inject(monkeypatch, code, where):
  """Makes a write of step 4's checkpoint raise OSError(code): `where` is 'mkdir' (the
  step directory, created in `save()`), 'data' (the data-iterator state, written in
  `save()`) or 'meta' (the meta JSON, written by a background thread)."""
  err = lambda path: OSError(code, os.strerror(code), path)
  if where == "mkdir":
    makedirs = os.makedirs

    def fake_makedirs(path, *a, **k):
      if str(path).endswith(TMP4):
        raise err(path)
      return makedirs(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)
  else:
    def fake_open(path, mode="r", **k):
      if TMP4 + os.sep + where in str(path) and "w" in mode:
        raise err(path)
      return open(path, mode, **k)
    monkeypatch.setattr(epath_backend, "open", fake_open, raising=False)


def _settle_after_each_save(monkeypatch):
  """Lets each async save finish before the next step, so that a background failure
  is there to be found by the next step's poll (rather than by the next save)."""
  save = checkpoint.save

  def save_and_settle(manager, step, *a, **k):
    save(manager, step, *a, **k)
    deadline = time.time() + 20
    while manager.is_saving_in_progress() and time.time() < deadline:
      time.sleep(0.01)
  monkeypatch.setattr(checkpoint, "save", save_and_settle)


@pytest.mark.parametrize("code,where,cause,last_step", [
    (errno.EACCES, "mkdir", "permission denied", 4),
    pytest.param(errno.EDQUOT, "data", "disk quota exceeded", 4,
                 marks=pytest.mark.slow),
    (errno.ENOSPC, "meta", "no space left on device", 5),  # Found by step 5's poll.
])
def test_failed_save_stops_the_run_at_once(tmp_path, monkeypatch, code, where, cause,
                                           last_step):
  workdir = str(tmp_path)
  _inject(monkeypatch, code, where)
  _settle_after_each_save(monkeypatch)
  t0 = time.time()
  config = test_train.tiny_config()  # Checkpoints at 2, 4, 6, 8; step 4's fails.
  config.checkpoint_every = 2
  with pytest.raises(errors.SaveError) as info:
    loop.run(config, workdir)
  assert time.time() - t0 < 30
  msg = str(info.value)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert f"checkpoint of step 4 to {ckpt_dir}: {cause}" in msg
  assert "Nothing already saved was lost" in msg and "step 2 is the latest" in msg
  assert "run the same command again" in msg and info.value.errno == code
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert rows[-1]["step"] == last_step  # Stopped right away (never reached 8).
  monkeypatch.undo()
  # Writers of step 4's other items may still be running (a process exit waits for
  # them too): let them end before start-up deletes step 4's leftovers.
  for thread in threading.enumerate():
    if type(thread).__module__.startswith("orbax."):
      thread.join(timeout=20)
  exp = loop.Experiment(config, workdir)
  manager = checkpoint.make_manager(workdir, config)  # Deletes the step-4 leftovers.
  try:
    assert manager.all_steps() == [2]
    state, step = checkpoint.restore(manager, exp.abstract)
  finally:
    manager.close()
  assert step == 2 and int(state.step) == 2
  assert sorted(os.listdir(ckpt_dir)) == ["2"]


def _refuse_writes_under(monkeypatch, directory):
  """Makes the start-up check's test write under `directory` fail, as a read-only
  directory would."""
  def fake_open(path, *a, **k):
    if str(path).startswith(directory + os.sep):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return open(path, *a, **k)
  monkeypatch.setattr(startup_checks, "open", fake_open, raising=False)


def test_start_up_check_refuses_unwritable_checkpoints_before_compiling(
    tmp_path, monkeypatch):
  ckpt_dir = str(tmp_path / "checkpoints")
  _refuse_writes_under(monkeypatch, ckpt_dir)
  monkeypatch.setattr(state_lib, "create_state", lambda *a: pytest.fail("compiled"))
  with pytest.raises(errors.WorkdirError,
                     match=re.escape(f"{ckpt_dir} is not writable (permission denied")):
    loop.run(test_train.tiny_config(), str(tmp_path))
  assert os.listdir(ckpt_dir) == []  # Created, probed, and left clean.
  # checkpoints_best/ is probed too when the config keeps the best evaluation.
  _refuse_writes_under(monkeypatch, str(tmp_path / "checkpoints_best"))
  startup_checks.check_workdir(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match="checkpoints_best is not writable"):
    startup_checks.check_workdir(str(tmp_path), best=True)


# --- For real, in a subprocess that may not write where the test makes it read-only.

# As root, file modes bind a process only without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH:
# this launcher drops both from the bounding set (needs CAP_SETPCAP), then execs
# `python ARGS...`, which thus runs without them (a fresh process: no fork of this one).
_AS_NON_ROOT = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
  if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
    sys.exit(f"prctl(PR_CAPBSET_DROP) failed: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def _unprivileged(tmp_path):
  """The command prefix that starts `python` such that a directory with mode 0o500 is
  unwritable for it; skips the test where there is none on this machine."""
  prefix = ([sys.executable, "-c", _AS_NON_ROOT] if os.geteuid() == 0
            else [sys.executable])
  probe = tmp_path / "probe"
  probe.mkdir()
  probe.chmod(0o500)
  try:
    proc = subprocess.run(prefix + ["-c", f"open({str(probe / 'x')!r}, 'w')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  finally:
    probe.chmod(0o700)
  if "PermissionError" not in proc.stderr:
    pytest.skip("cannot start a process that file modes apply to (root without "
                f"CAP_SETPCAP?): {proc.stderr[-300:]}")
  return prefix


TINY = [
    "--config=configs/demo.py", "--config.batch_size=8", "--config.total_steps=8",
    "--config.log_every=1", "--config.checkpoint_every=4",
    "--config.keep_checkpoints=10", "--config.model.embed_dim=16",
    "--config.model.image.width=32", "--config.model.image.depth=1",
    "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
    "--config.model.image.patch_size=8", "--config.model.text.width=32",
    "--config.model.text.depth=1", "--config.model.text.mlp_dim=64",
    "--config.model.text.num_heads=2", "--config.model.text.context_length=24",
    "--config.model.decoder.depth=1", "--config.model.decoder.num_queries=4",
    "--config.data.image_size=32", "--config.optim.warmup_steps=2",
    "--config.plot=False", "--config.evals.zeroshot.every=-1",
    "--config.evals.retrieval.every=-1", "--config.evals.captioning.every=-1",
]
# main.py, made to chmod checkpoints/ to 0o500 once the step-4 checkpoint is complete.
_LOCK_AFTER_FIRST_SAVE = """
import os, runpy, sys
from vlp_jax.train import checkpoint
save = checkpoint.save
def save_then_lock(manager, step, *a, **k):
  save(manager, step, *a, **k)
  if step == 4:
    manager.wait_until_finished()
    os.chmod(str(manager.directory), 0o500)
checkpoint.save = save_then_lock
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


def _main(python, argv, lock_after_first_save=False):
  cmd = python + (["-c", _LOCK_AFTER_FIRST_SAVE] if lock_after_first_save
                  else ["main.py"])
  t0 = time.time()
  proc = subprocess.run(cmd + argv, cwd=ROOT, capture_output=True, text=True,
                        timeout=400)
  return proc, time.time() - t0


def test_unwritable_checkpoints_stop_main_within_seconds_then_resume(tmp_path):
  python = _unprivileged(tmp_path)
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  argv = TINY + [f"--workdir={workdir}"]
  proc, elapsed = _main(python, argv, lock_after_first_save=True)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert elapsed < 120, elapsed  # Start-up and compilation; the failure itself is at once.
  assert (f"error: Could not save the checkpoint of step 8 to {ckpt_dir}: permission "
          "denied") in out, out[-3000:]
  assert "Traceback" not in out and "TimeoutError" not in out
  # Still unwritable: the same command stops at the start-up check, before compiling.
  proc, elapsed = _main(python, argv)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1 and f"error: {ckpt_dir} is not writable" in out, out[-3000:]
  assert "Initialised a new model" not in out and "Resumed from" not in out
  # Writable again: the same command resumes from step 4 and finishes.
  ckpt_dir.chmod(0o755)
  proc, elapsed = _main(python, argv)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "Resumed from the checkpoint at step 4" in out
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]
  rows = metrics_lib.read_metrics(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 9))
