"""Fault injection: for each of 20 seeds, main.py is SIGKILLed at a random point (between
saves, during an async save, or right after one), the newest checkpoint is damaged in a
third of them (one of `test_reliability.DAMAGES`, rotating), and the same command is run
again until it exits 0. Every seed must end with the uninterrupted run's per-step losses,
bitwise, each step logged once.

Run with `pytest -s -m slow tests/test_fault_injection.py` (~7 min on 2 cores): the
module teardown prints each seed's mode / damage / outcome and "N/20 seeds reproduced
the uninterrupted run". All launches share one JAX compilation cache, so every restart
reuses the reference run's executables (the same numbers, and no compiling)."""
import os
import re
import signal
import time

import numpy as np
import pytest

from tests.test_multiprocess import rows
from tests.test_preemption import checkpoints, flags, last_step, launch
from tests.test_reliability import DAMAGES
from vlp_jax.train import checkpoint_health, workdir_lock

TOTAL, EVERY = 20, 4
ARGS = flags(f"--config.total_steps={TOTAL}", f"--config.checkpoint_every={EVERY}",
             "--config.keep_checkpoints=2", "--config.log_every=1",
             "--config.evals.zeroshot.every=-1")
KEYS = ("loss", "clip/loss", "caption/loss", "grad_norm", "lr")
SEEDS = range(20)
MODES = ("between", "during", "after")
KINDS = sorted(DAMAGES)
SAVES = list(range(2 * EVERY, TOTAL + 1, EVERY))  # 8, 12, 16, 20: a checkpoint before.
POLL = 0.002  # s: a save takes ~0.3 s here, so the tmp directory is not missed.
MAX_RELAUNCHES = 3
RESULTS = {}  # seed -> summary line.


def plan(seed):
  """(mode, damage kind or None, target step) of `seed`: the modes rotate so that each
  damage kind and each mode meet; the step is drawn by RandomState(seed)."""
  rng = np.random.RandomState(seed)
  mode = MODES[(seed + seed // 3) % len(MODES)]
  damage = KINDS[(seed // 3) % len(KINDS)] if seed % 3 == 0 else None
  if mode == "between":  # Not a save step; after two checkpoints when damaging.
    lo = 2 * EVERY + 1 if damage else EVERY + 2
    target = int(rng.choice([s for s in range(lo, TOTAL) if s % EVERY]))
  elif mode == "during":  # Damage needs an older checkpoint than the newest complete one.
    target = int(rng.choice(SAVES[1:] if damage else SAVES))
  else:
    target = int(rng.choice(SAVES))
  return mode, damage, target


def tmp_dirs(workdir, step=None):
  path = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(path)
  except FileNotFoundError:
    return []
  prefix = str(step) if step is not None else r"\d+"
  return [n for n in names if re.match(prefix + r"\.orbax-checkpoint-tmp", n)]


def poll_until(proc, cond, timeout=240):
  """Polls `cond` every POLL s; False if `proc` ended first."""
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      return False
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(POLL)
  return True


def tree(path):
  return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(path) for f in fs} | {
              os.path.relpath(d, path) + "/": 0 for d, _, _ in os.walk(path)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  """The uninterrupted run's metrics rows (it also fills the compilation cache)."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  proc = launch(workdir, ARGS, cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  got = rows(workdir)
  assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
  return got


@pytest.fixture(scope="module", autouse=True)
def summary():
  t0 = time.time()
  yield
  if not RESULTS:
    return
  ok = sum(line.endswith("reproduced") for line in RESULTS.values())
  print("\n\nFault injection (mode / damage / outcome per seed):")
  for seed in sorted(RESULTS):
    print(f"  seed {seed:2d}: {RESULTS[seed]}")
  by_mode = {}
  for seed, line in RESULTS.items():
    m = plan(seed)[0]
    by_mode.setdefault(m, [0, 0])[0] += line.endswith("reproduced")
    by_mode[m][1] += 1
  print("  by mode: " + ", ".join(f"{m} {a}/{n}" for m, (a, n) in sorted(by_mode.items())))
  if ok == len(RESULTS):
    print(f"{ok}/{len(RESULTS)} seeds reproduced the uninterrupted run "
          f"({time.time() - t0:.0f} s)")
  else:
    print(f"{ok}/{len(RESULTS)} seeds reproduced the uninterrupted run; failed: "
          f"{sorted(s for s, l in RESULTS.items() if not l.endswith('reproduced'))}")


def kill(proc, workdir, mode, target):
  """Runs `proc` to its kill point, SIGKILLs it; returns a description of where."""
  if mode == "between":
    alive = poll_until(proc, lambda: last_step(workdir) >= target)
  elif mode == "during":
    alive = poll_until(proc, lambda: tmp_dirs(workdir, target) or
                       target in checkpoints(workdir))
  else:
    alive = poll_until(proc, lambda: target in checkpoints(workdir))
  if alive:
    proc.send_signal(signal.SIGKILL)
  out = proc.communicate(timeout=120)[0]
  if not alive or proc.returncode != -signal.SIGKILL:
    assert proc.returncode == 0, out[-3000:]
    return "exited 0 before the kill"
  where = f"killed at step {last_step(workdir)}"
  if mode == "during":
    landed = bool(tmp_dirs(workdir, target)) and target not in checkpoints(workdir)
    where += (f", save {target} in progress" if landed else
              f", save {target} already finished (missed)")
  left = sorted(int(n.split(".")[0]) for n in tmp_dirs(workdir))
  return where + f", checkpoints {checkpoints(workdir)}" + (
      f" + tmp dir of {left}" if left else "")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_and_damage_then_resume_reproduces_the_uninterrupted_run(
    seed, reference, cache, tmp_path):
  mode, damage, target = plan(seed)
  workdir = str(tmp_path / "run")
  desc = f"{mode:7s} target {target:2d}, damage {damage or '-':17s}"
  RESULTS[seed] = desc + " | FAILED before the kill"
  where = kill(launch(workdir, ARGS, cache), workdir, mode, target)
  RESULTS[seed] = f"{desc} | {where} | FAILED"
  damaged_step = None
  if damage:
    steps = checkpoints(workdir)
    assert len(steps) >= 2, (where, "damage needs an older checkpoint to fall back to")
    damaged_step = steps[-1]
    step_dir = os.path.join(workdir, "checkpoints", str(damaged_step))
    before = tree(step_dir)
    DAMAGES[damage][0](step_dir)
    assert tree(step_dir) != before, f"damage {damage} changed nothing in {step_dir}"
    where += f", damaged step {damaged_step}"
  outs = []
  for _ in range(MAX_RELAUNCHES):
    proc = launch(workdir, ARGS, cache)
    outs.append(proc.communicate(timeout=600)[0])
    if proc.returncode == 0:
      break
  RESULTS[seed] = f"{desc} | {where} | {len(outs)} relaunch(es) | FAILED"
  assert proc.returncode == 0, "\n\n".join(o[-3000:] for o in outs)
  got = rows(workdir)
  assert [r["step"] for r in got] == list(range(1, TOTAL + 1)), [r["step"] for r in got]
  for a, b in zip(got, reference):
    for key in KEYS:
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))
  assert not tmp_dirs(workdir), os.listdir(os.path.join(workdir, "checkpoints"))
  assert checkpoints(workdir)[-1] == TOTAL
  if damaged_step is not None:
    moved = os.path.join(workdir, checkpoint_health.DAMAGED_DIR, str(damaged_step))
    assert os.path.isdir(moved), (os.listdir(workdir), outs[-1][-3000:])
    assert f"instead of the newest checkpoint step {damaged_step}" in outs[0]
  RESULTS[seed] = f"{desc} | {where} | {len(outs)} relaunch(es) | reproduced"
