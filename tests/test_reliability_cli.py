"""main.py as a user runs it: a second run on a busy workdir is refused and loses the first
nothing; user errors print one message and no traceback; logs off a terminal carry no
progress-bar updates."""
import os
import subprocess
import sys

import pytest

from tests.test_multiprocess import ROOT, rows
from tests.test_preemption import flags, launch, last_step, wait_for

RUN = flags("--config.total_steps=24", "--config.checkpoint_every=4",
            "--config.evals.zeroshot.every=-1")
KEYS = ("loss", "clip/loss", "caption/loss", "grad_norm")


# ~45 s (three main.py processes). In make test the lock's refusal and takeover are
# test_reliability.py's in-process tests, the one-line CLI errors the test below.
@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused_and_the_first_is_untouched(tmp_path):
  workdir, ref_dir = str(tmp_path / "run"), str(tmp_path / "ref")
  cache = tmp_path / "jax_cache"
  first = launch(workdir, RUN, cache)
  ref = launch(ref_dir, RUN, cache)
  wait_for(first, lambda: last_step(workdir) >= 2)
  second = launch(workdir, RUN, cache)
  out2 = second.communicate(timeout=240)[0]
  assert second.returncode == 1, out2[-3000:]
  assert f"error: Another run is using {workdir}" in out2
  assert f"pid {first.pid}" in out2 and "started 20" in out2
  assert "Traceback" not in out2
  out1, out_ref = first.communicate(timeout=300)[0], ref.communicate(timeout=300)[0]
  assert first.returncode == 0 and ref.returncode == 0, out1[-3000:] + out_ref[-3000:]
  got, want = rows(workdir), rows(ref_dir)
  assert [r["step"] for r in got] == list(range(1, 25))  # Not interleaved.
  for a, b in zip(got, want):
    assert [a.get(k) for k in KEYS] == [b.get(k) for k in KEYS], (a, b)  # Bitwise.
  # stdout is a pipe: the periodic log lines, no carriage-return bar updates.
  assert "\r" not in out1 and "step 24/24" in out1
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # Released at the end.


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "main.py", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=240)


def test_user_errors_print_one_message_and_exit_1(tmp_path):
  bad_lr = _main(f"--workdir={tmp_path / 'w'}", *flags("--config.optim.lr=-1.0"))
  assert bad_lr.returncode == 1, bad_lr.stderr[-3000:]
  assert "Traceback" not in bad_lr.stderr
  assert "error: config.optim.lr" in bad_lr.stderr
  verbose = _main(f"--workdir={tmp_path / 'w'}", "--verbose", *flags("--config.optim.lr=-1.0"))
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
  typo = tmp_path / "no_such_run"
  ev = _main(f"--workdir={typo}", "--mode=eval", *flags())
  assert ev.returncode == 1 and "Traceback" not in ev.stderr, ev.stderr[-3000:]
  assert "No checkpoints to evaluate" in ev.stderr
  assert not typo.exists()  # Evaluation created nothing.
