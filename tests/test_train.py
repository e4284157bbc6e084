"""End-to-end: train, log, checkpoint, resume exactly, evaluate (tiny CoCa on shapes)."""
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from configs import demo
from vlp_jax import sharding as vlp_sharding
from vlp_jax.train import loop, metric_writer as metrics_lib


def tiny_config(total_steps=8, evals=False):
  c = demo.get_config()
  c.batch_size = 8
  c.total_steps = total_steps
  c.log_every = 1
  c.checkpoint_every = 4
  c.keep_checkpoints = 10
  c.model.embed_dim = 16
  c.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  c.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2, context_length=24)
  c.model.decoder.update(depth=1, num_queries=4)
  c.data.image_size = 32
  c.optim.warmup_steps = 2
  c.plot = evals
  if evals:
    c.evals.zeroshot.update(every=0, size=24, batch_size=8)
    c.evals.retrieval.update(every=0, size=16, batch_size=8)
    c.evals.captioning.update(every=0, size=8, batch_size=8)
  else:
    c.evals = {}
  return c


# The runs of a config share one set-up (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_compilations")


def losses(workdir):
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 8-step run with evaluation at the end."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  loop.run(tiny_config(evals=True), workdir)
  return workdir


def test_outputs_of_a_run(reference_run):
  rows = metrics_lib.read_metrics(os.path.join(reference_run, "metrics.jsonl"))
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 9))
  for key in ("clip/loss", "caption/loss", "lr", "grad_norm", "logit_scale",
              "steps_per_sec", "samples_per_sec"):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  # The logged total is the weighted sum of the objectives (clip 1, caption 2).
  for r in train_rows:
    np.testing.assert_allclose(r["loss"], r["clip/loss"] + 2 * r["caption/loss"], rtol=1e-5)
  evals = [r for r in rows if "eval/zeroshot/top1" in r]
  assert len(evals) == 1 and evals[0]["step"] == 8
  for key in ("eval/retrieval/i2t_r1", "eval/retrieval/t2i_r10", "eval/captioning/bleu4",
              "eval/captioning/cider", "eval/zeroshot/top5"):
    assert 0.0 <= evals[0][key] <= (10.0 if "cider" in key else 1.0), key
  with open(os.path.join(reference_run, "config.json")) as f:
    saved = json.load(f)
  assert saved["batch_size"] == 8 and saved["model"]["name"] == "coca"
  assert os.path.exists(os.path.join(reference_run, "curves.png"))
  assert sorted(os.listdir(os.path.join(reference_run, "checkpoints"))) == ["4", "8"]
  assert os.listdir(os.path.join(reference_run, "tensorboard"))


def test_resume_after_lost_checkpoint_is_exact(reference_run, tmp_path):
  """Losing everything after step 4 and rerunning reproduces the same losses bitwise."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  loop.run(tiny_config(), workdir)
  assert losses(workdir) == losses(reference_run)


# SIGINT takes the same handler as SIGTERM (signals.StopRequest): slow.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    signal.SIGTERM])
def test_signal_saves_and_resumes_exactly(reference_run, tmp_path, monkeypatch, signum):
  """Ctrl-C / SIGTERM mid-run: the step finishes, a checkpoint is saved, the run returns;
  rerunning finishes with the losses of an uninterrupted run."""
  workdir = str(tmp_path / "run")
  calls = {"n": 0}
  original = vlp_sharding.make_global_batch

  def signal_on_step_6(batch, mesh, rules):
    calls["n"] += 1
    # Device prefetch transfers batch 6 + device_prefetch while fetching batch 6.
    if calls["n"] == 6 + tiny_config().device_prefetch:
      os.kill(os.getpid(), signum)
    return original(batch, mesh, rules)

  monkeypatch.setattr(vlp_sharding, "make_global_batch", signal_on_step_6)
  loop.run(tiny_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  assert losses(workdir) == losses(reference_run)[:6]
  monkeypatch.setattr(vlp_sharding, "make_global_batch", original)
  loop.run(tiny_config(), workdir)
  assert losses(workdir) == losses(reference_run)


def test_eval_mode_on_a_trained_workdir(reference_run):
  results = loop.evaluate(tiny_config(evals=True), reference_run)
  rows = metrics_lib.read_metrics(os.path.join(reference_run, "metrics.jsonl"))
  at_end = [r for r in rows if "eval/zeroshot/top1" in r]
  # Evaluating the same checkpoint again gives the same figures as at the end of training.
  assert results["eval/zeroshot/top1"] == at_end[0]["eval/zeroshot/top1"]
  assert results["eval/retrieval/i2t_r1"] == at_end[0]["eval/retrieval/i2t_r1"]


def test_training_reduces_the_loss(tmp_path):
  c = tiny_config(total_steps=40)
  c.log_every = 10
  c.checkpoint_every = 40
  c.optim.lr = 3e-3
  loop.run(c, str(tmp_path))
  first, last = losses(str(tmp_path))[0][1], losses(str(tmp_path))[-1][1]
  assert last < 0.7 * first, (first, last)


def test_checkpoint_of_another_model_is_a_clear_error(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run, workdir)
  c = tiny_config()
  c.model.text.width = 48
  # The saved config.json catches the change first, naming the key ...
  with pytest.raises(ValueError, match=r"model keys: model.text.width: 32 -> 48.*"
                     "--allow_config_change"):
    loop.run(c, workdir)
  # ... and with the change declared deliberate, the checkpoint lists the parameters.
  with pytest.raises(ValueError, match="does not match the model") as e:
    loop.run(c, workdir, allow_config_change=True)
  assert re.search(r"with other shapes \d+: \['\w+'\].*: checkpoint \(\d+, 32\) vs "
                   r"model \(\d+, 48\)", str(e.value)), str(e.value)
