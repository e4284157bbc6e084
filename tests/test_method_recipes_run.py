"""The issue-15 method recipes as a user runs them: `main.py --config=configs/NAME.py:
runlocal` on the built-in `shapes` data at batch 8, SIGKILLed after a checkpoint and
restarted: the restarted run's metrics equal an uninterrupted run's bitwise (with the
momentum teacher, the memory queue and the views in the state and the batch)."""
import os
import signal

import pytest

from tests.test_preemption import checkpoints, last_step, launch, wait_for
from tests.test_multiprocess import rows

TOTAL = 6
# All slow (`make test-all`): three main.py runs each, about a minute on 2 cores. The
# fast suite keeps each piece's exact resume in-process (test_teacher, test_queue,
# test_views: test_resume_*) and SIGKILL restarts of main.py (test_preemption,
# test_fault_injection).
RECIPES = [pytest.param(n, id=n.split("_")[0], marks=pytest.mark.slow)
           for n in ("tcl_b16", "pyramidclip_b16", "siglip2_b16", "m3ae_b16")]


def flags(name):
  return [f"--config=configs/{name}.py:runlocal", "--config.batch_size=8",
          f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2",
          "--config.keep_checkpoints=3", "--config.log_every=1", "--config.plot=False",
          "--config.evals={}"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_and_resumes_bitwise_after_sigkill(name, tmp_path):
  ref_dir, workdir = str(tmp_path / "ref"), str(tmp_path / "run")
  cache = tmp_path / "jax_cache"
  ref = launch(ref_dir, flags(name), cache)
  out = ref.communicate(timeout=600)[0]
  assert ref.returncode == 0, out[-3000:]
  proc = launch(workdir, flags(name), cache)
  wait_for(proc, lambda: last_step(workdir) >= 3 and checkpoints(workdir), timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL
  restarted = launch(workdir, flags(name), cache)
  out = restarted.communicate(timeout=600)[0]
  assert restarted.returncode == 0, out[-3000:]
  assert "Resumed from the checkpoint" in out
  got, want = rows(workdir), rows(ref_dir)
  assert [r["step"] for r in got] == list(range(1, TOTAL + 1))
  assert [r["step"] for r in want] == list(range(1, TOTAL + 1))
  keys = [k for k in want[-1] if k == "loss" or k.endswith("/loss") or k in (
      "grad_norm", "teacher_momentum")]
  assert "loss" in keys and len(keys) >= 2, keys
  for a, b in zip(got, want):
    for key in keys:
      assert a[key] == b[key], (a["step"], key, a[key], b[key])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(TOTAL)))
