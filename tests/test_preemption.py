"""Subprocess runs killed with SIGKILL / stopped with SIGTERM, then restarted: the final
metrics equal an uninterrupted run's bitwise, with no step logged twice; two processes
stop at the same step when only one of them gets SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_multiprocess import ROOT, TINY, free_port, rows



def flags(*overrides):
  """TINY with `overrides` ('--flag=value') replacing flags of the same name."""
  names = {o.split("=")[0] for o in overrides}
  return [a for a in TINY if a.split("=")[0] not in names] + list(overrides)


def launch(workdir, args, cache=None):
  """main.py in a subprocess; `cache`: a JAX compilation cache shared by restarts
  (the same executables, so the same numbers, without compiling again)."""
  env = dict(os.environ)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}"] + args,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


TOTAL = 28
CHAIN = flags(f"--config.total_steps={TOTAL}", "--config.checkpoint_every=4",
              "--config.keep_checkpoints=2", "--config.evals.zeroshot.every=-1")
KEYS = ("loss", "clip/loss", "caption/loss", "grad_norm", "lr", "logit_scale")


def last_step(workdir):
  try:
    return max((r["step"] for r in rows(workdir)), default=0)
  except (FileNotFoundError, ValueError):  # Not there yet, or a line half written.
    return 0


def checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(
      path) else []


def wait_for(proc, cond, timeout=240):
  t0 = time.time()
  while not cond():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.02)


# ~50 s on 2 cores (six launches of main.py sharing one compilation cache); in
# `make test` because it is the acceptance test of kill-and-resume.
# ~1.5 min. In make test, exact resume after SIGTERM is test_train's in-process
# test_signal_saves_and_resumes_exactly, and a main.py resume test_save_errors'.
@pytest.mark.slow
def test_sigkill_and_sigterm_restarts_reproduce_an_uninterrupted_run(tmp_path):
  ref_dir, workdir = str(tmp_path / "ref"), str(tmp_path / "run")
  cache = tmp_path / "jax_cache"
  ref = launch(ref_dir, CHAIN, cache)
  resumed_from, stopped_at = [], None
  # Each interruption lands after a checkpoint newer than the one resumed from.
  for target, sig in [(6, signal.SIGKILL), (13, signal.SIGTERM), (19, signal.SIGKILL),
                      (25, signal.SIGKILL)]:
    proc = launch(workdir, CHAIN, cache)
    floor = max(checkpoints(workdir), default=0)
    wait_for(proc, lambda: last_step(workdir) >= target and
             max(checkpoints(workdir), default=0) > floor)
    print(f"interrupting at step {last_step(workdir)} with {sig.name}")
    proc.send_signal(sig)
    t0 = time.time()
    out = proc.communicate(timeout=120)[0]
    if sig == signal.SIGKILL:
      assert proc.returncode == -signal.SIGKILL
    else:  # Finishes the step, saves, exits 0 with a message.
      assert proc.returncode == 0, out[-3000:]
      assert time.time() - t0 < 30
      stopped_at = max(checkpoints(workdir))
      assert f"Stopped by SIGTERM at step {stopped_at}" in out
      assert last_step(workdir) == stopped_at
    resumed_from.append(out)
  final = launch(workdir, CHAIN, cache)
  out = final.communicate(timeout=300)[0]
  assert final.returncode == 0, out[-3000:]
  assert ref.wait(timeout=300) == 0
  # Each restart resumed from a checkpoint; the one after SIGTERM from its stop step.
  assert all("Resumed from the checkpoint" in o for o in resumed_from[1:] + [out])
  assert f"Resumed from the checkpoint at step {stopped_at}" in resumed_from[2]
  got, want = rows(workdir), rows(ref_dir)
  assert [r["step"] for r in got] == list(range(1, TOTAL + 1))  # No step twice.
  for a, b in zip(got, want):
    for key in KEYS:
      assert a[key] == b[key], (a["step"], key, a[key], b[key])


@pytest.mark.slow  # ~1.5 min: two gloo processes.
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  port = free_port()
  args = flags("--config.total_steps=400", "--config.checkpoint_every=1000",
                "--config.evals.zeroshot.every=-1", "--num_cpu_devices=2",
                "--num_processes=2", f"--coordinator_address=127.0.0.1:{port}")
  workdir = str(tmp_path)
  procs = [launch(workdir, args + [f"--process_id={i}"]) for i in range(2)]
  wait_for(procs[0], lambda: last_step(workdir) >= 3)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  (step,) = checkpoints(workdir)
  assert 3 <= step < 400
  assert f"Stopped by SIGTERM at step {step}" in outs[1]
  assert f"Stopped by another process at step {step}" in outs[0]
  assert last_step(workdir) == step
