"""Non-finite steps, checkpoint policy, frozen parameters, init_from, start-up checks."""
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from configs import common
from vlp_jax import sharding as vlp_sharding
from vlp_jax import config as config_lib
from vlp_jax import validation
from vlp_jax import errors, sharding
from vlp_jax.data import pipeline
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import checkpoint, freeze, init_from, loop, nonfinite, startup_checks
from vlp_jax.train import metric_writer as metrics_lib, state as state_lib, step as step_lib

POISON = -100.0  # A pixel value that makes the test objective below non-finite.

# One set-up per config for the module's runs (tests/conftest.py); the loop tests use
# tiny_config()'s 8 steps, whose train step the session compiles once.
pytestmark = pytest.mark.usefixtures("shared_compilations")


def nan_probe(outputs, batch, cfg):
  """Test-only objective: 0 normally; NaN (and a NaN gradient) when the batch holds a
  POISON pixel."""
  del cfg
  poisoned = jnp.any(batch["image"] <= POISON)
  loss = jnp.where(poisoned, jnp.nan, 0.0) * jnp.mean(outputs["image_emb"])
  return loss, {"loss": loss}


OBJECTIVES.register("nan_probe", replace=True, reads=("image_emb",),
                    batch_keys=("image",))(nan_probe)


def probe_config(**kw):
  c = test_train.tiny_config()
  c.objectives = {"clip": 1.0, "caption": 2.0, "nan_probe": 1.0}
  for k, v in kw.items():
    c[k] = v
  return c


def poison(batch):
  batch = dict(batch)
  image = np.array(batch["image"])
  image[0, 0, 0, 0] = POISON
  batch["image"] = image
  return batch


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("accum_steps", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_nonfinite_step_leaves_state_bitwise_unchanged(accum_steps):
  config = probe_config(accum_steps=accum_steps)
  exp = loop.Experiment(config, "/unused")
  objs = step_lib.objectives_from_config(config)
  fn = step_lib.make_train_step(exp.model, objs, exp.tx, exp.schedule, exp.state_shardings,
                                sharding.batch_sharding(exp.mesh, exp.rules),
                                accum_steps=accum_steps)
  it = iter(pipeline.train_dataset(config, exp.tokenizer))
  batches = [pipeline.split_bad_counts(next(it))[0] for _ in range(2)]
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    state, m = fn(state, sharding.make_global_batch(batches[0], exp.mesh, exp.rules))
    assert not np.asarray(m["nonfinite"]).any()
    before = jax.device_get(state)
    state, m = fn(state, sharding.make_global_batch(poison(batches[1]), exp.mesh,
                                                    exp.rules))
  flags = np.asarray(m["nonfinite"])
  # [any, gradient, clip, caption, nan_probe]: only the probe and the gradient.
  assert flags.tolist() == [True, True, False, False, True]
  assert not np.isfinite(float(m["loss"]))
  after = jax.device_get(state)
  assert leaves_equal(after.params, before.params)
  assert leaves_equal(after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1


def _poison_at(monkeypatch, step):
  calls = {"n": 0}
  original = sharding.make_global_batch

  def fake(batch, mesh, rules):
    calls["n"] += 1
    return original(poison(batch) if calls["n"] == step else batch, mesh, rules)
  monkeypatch.setattr(vlp_sharding, "make_global_batch", fake)


def test_halt_names_step_and_objective_and_keeps_last_checkpoint_finite(
    tmp_path, monkeypatch):
  _poison_at(monkeypatch, 6)
  with pytest.raises(nonfinite.NonFiniteError, match=r"Step 6 .*nan_probe, gradient"):
    loop.run(probe_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  config = probe_config()
  exp = loop.Experiment(config, str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), config)
  state, step = checkpoint.restore(manager, exp.abstract)
  manager.close()
  assert step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_skip_counts_and_continues(tmp_path, monkeypatch):
  _poison_at(monkeypatch, 6)
  loop.run(probe_config(nonfinite="skip"), str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
          if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["nonfinite/skipped"] for r in rows] == [0] * 5 + [1] * 3
  assert rows[5]["loss"] == "nan" and all(isinstance(r["loss"], float)
                                          for r in rows if r["step"] != 6)
  with open(tmp_path / "checkpoints" / "8" / "meta" / "metadata") as f:
    assert json.load(f)["nonfinite_skipped"] == 1


def test_checkpoint_policy_keep_every_best_and_tmp_dirs(tmp_path):
  c = test_train.tiny_config()
  c.checkpoint_every, c.keep_checkpoints, c.keep_every = 1, 1, 3
  c.evals = {"zeroshot": common.eval_entry(type="zeroshot", every=2, size=24,
                                               batch_size=8)}
  c.best_metric = "eval/zeroshot/top1"
  workdir = str(tmp_path)
  loop.run(c, workdir)
  # keep_every=3 keeps 3 and 6 besides the newest (8).
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["3", "6", "8"]
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [(r["step"], r[c.best_metric]) for r in rows if c.best_metric in r]
  assert [s for s, _ in evals] == [2, 4, 6, 8]
  best_step = max(evals, key=lambda x: x[1])[0]  # The first of equals.
  assert os.listdir(tmp_path / "checkpoints_best") == [str(best_step)]
  with open(tmp_path / "checkpoints" / "8" / "meta" / "metadata") as f:
    meta = json.load(f)
  assert meta["config"]["total_steps"] == 8 and meta["best"]["step"] == best_step
  assert [s for s, _ in meta["best_history"]] == [2, 4, 6, 8]
  # An interrupted save (Orbax's tmp dir) is never taken for the latest checkpoint.
  tmp = tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_text("partial")
  exp = loop.Experiment(c, workdir)
  manager = checkpoint.make_manager(workdir, c)
  assert manager.latest_step() == 8
  state, step = checkpoint.restore(manager, exp.abstract)
  manager.close()
  assert step == 8 and int(state.step) == 8
  assert not tmp.exists()  # ... and is cleaned up at start-up.
  # The best parameters can seed a new run (init_from a checkpoints_best/ step).
  c.init_from.checkpoint = str(tmp_path / "checkpoints_best" / str(best_step))
  params, _, report = init_from.load(c.init_from, state.params, exp.tx,
                                     exp.state_shardings.opt_state)
  assert report.loaded == list(freeze.named_leaves(state.params))
  assert not report.missing and not report.unexpected and not report.shape_mismatch
  if best_step != 8:  # Trained further after the best: the values differ.
    assert not leaves_equal(jax.device_get(params), jax.device_get(state.params))


def lit_config():
  c = test_train.tiny_config(total_steps=20)
  c.frozen = ["img/.*", "img_proj/.*"]
  return c


def test_lit_frozen_tower_is_bit_identical_and_has_no_optimizer_state():
  config = lit_config()
  exp = loop.Experiment(config, "/unused")
  fn = step_lib.make_train_step(exp.model, step_lib.objectives_from_config(config),
                                exp.tx, exp.schedule, exp.state_shardings,
                                sharding.batch_sharding(exp.mesh, exp.rules))
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  init = jax.device_get(state.params)
  it = iter(pipeline.train_dataset(config, exp.tokenizer))
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    for _ in range(20):
      batch = pipeline.split_bad_counts(next(it))[0]
      state, _ = fn(state, sharding.make_global_batch(batch, exp.mesh, exp.rules))
  params = jax.device_get(state.params)
  for tower in ("img", "img_proj"):
    assert leaves_equal(params[tower], init[tower]), tower
  assert not leaves_equal(params["txt"], init["txt"])  # The rest trained.
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert opt_paths and not [p for p in opt_paths if "'img'" in p or "'img_proj'" in p]
  trainable = [n for n in freeze.named_leaves(params) if not n.startswith("img")]
  assert sum("mu" in p for p in opt_paths) == len(trainable)


def test_frozen_pattern_matching_nothing_is_an_error():
  config = test_train.tiny_config()
  config.frozen = ["image/.*"]
  with pytest.raises(ValueError, match=r"'image/\.\*' matches no parameter"):
    loop.Experiment(config, "/unused")


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
  """A 'trained' two-tower CLIP checkpoint: init + 1 on every parameter, at step 7."""
  workdir = str(tmp_path_factory.mktemp("clip"))
  config = test_train.tiny_config()
  config.model.name = "two_tower"
  config.objectives = {"clip": 1.0}
  exp = loop.Experiment(config, workdir)
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  # Jitted: one compile for all leaves (not one per leaf shape).
  state = state.replace(params=jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))(
      state.params))
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, 7, state)
  manager.wait_until_finished()
  manager.close()
  return workdir, jax.device_get(state.params)


def _init(config):
  exp = loop.Experiment(config, "/unused")
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  fresh = jax.device_get(state.params)
  return init_from.apply(config.init_from, state, exp.tx, exp.state_shardings), fresh


def test_init_from_loads_a_clip_image_tower_into_coca_for_lit(trained_clip):
  workdir, source = trained_clip
  config = lit_config()  # CoCa with a frozen image tower.
  config.init_from.workdir = workdir
  # Loading everything: CoCa's pools, decoder... are missing from CLIP, and CLIP's
  # ViT has a class token that CoCa's lacks -> a clear error listing both.
  with pytest.raises(ValueError, match=r"missing from the checkpoint \d+: "
                     r"\['caption_pool/.*in the checkpoint but not the model 1: "
                     r"\['img/cls'\] \(add them to init_from.exclude\)"):
    _init(config)
  config.init_from.include = ["img/.*", "img_proj/.*"]
  config.init_from.exclude = ["img/cls"]
  state, fresh = _init(config)
  params = jax.device_get(state.params)
  loaded = {k: v for k, v in freeze.named_leaves(params).items() if k.startswith("img")}
  src = freeze.named_leaves(source)
  assert loaded and all(np.array_equal(v, src[k]) for k, v in loaded.items())
  assert leaves_equal(params["txt"], fresh["txt"])  # Not selected: fresh init.
  assert int(state.step) == 0
  # Fresh optimizer state (Adam moments zero).
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.opt_state)
             if np.asarray(x).ndim > 0)


def test_init_from_reports_shape_mismatch_and_unexpected(trained_clip):
  workdir, source = trained_clip
  config = test_train.tiny_config()
  config.model.name = "two_tower"
  config.objectives = {"clip": 1.0}
  config.model.text.width = 48
  config.init_from.workdir = workdir
  with pytest.raises(ValueError, match=r"with other shapes \d+: \['txt/.*\(\d+, 32\)->"
                     r"\(\d+, 48\)"):
    _init(config)
  config.init_from.allow_shape_mismatch = ["txt/.*", "txt_proj/.*"]
  state, fresh = _init(config)
  params = freeze.named_leaves(jax.device_get(state.params))
  src = freeze.named_leaves(source)
  init = freeze.named_leaves(fresh)
  reshaped = [k for k in params if k in src and params[k].shape != src[k].shape]
  assert reshaped and all(np.array_equal(params[k], init[k]) for k in reshaped)
  same = [k for k in params if k in src and params[k].shape == src[k].shape]
  assert all(np.array_equal(params[k], src[k]) for k in same)
  # A checkpoint parameter the model lacks: found from the parameters' names and
  # shapes, before anything is restored (so the model's abstract state will do).
  config = test_train.tiny_config()
  config.model.name = "two_tower"
  config.objectives = {"clip": 1.0}
  config.model.image.pool = "map"
  config.init_from.workdir = workdir
  config.init_from.allow_missing = [".*"]
  exp = loop.Experiment(config, "/unused")
  with pytest.raises(ValueError, match="in the checkpoint but not the model"):
    init_from.apply(config.init_from, exp.abstract, exp.tx, exp.state_shardings)


def test_init_from_is_ignored_when_the_run_resumes(trained_clip, tmp_path):
  """A resumed fine-tune continues from its own checkpoint, not init_from."""
  workdir, _ = trained_clip
  config = test_train.tiny_config()  # trained_clip's config: one set-up, one step.
  config.model.name = "two_tower"
  config.objectives = {"clip": 1.0}
  config.init_from.workdir = workdir
  run_dir = str(tmp_path / "ft")
  loop.run(config, run_dir)
  first = metrics_lib.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  shutil.rmtree(os.path.join(run_dir, "checkpoints", "8"))  # Stopped after step 4's.
  config.init_from.workdir = "/nonexistent"  # Would fail if it were read.
  loop.run(config, run_dir)
  rows = metrics_lib.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == list(range(1, 9)) and rows[:4] == first[:4]
  # Resumed from step 4's parameters, not init_from's: the same steps 5..8 again.
  assert [r["loss"] for r in rows] == [r["loss"] for r in first]


def test_unwritable_workdir_fails_before_compiling(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setattr(state_lib, "create_state", lambda *a: pytest.fail("compiled"))
  with pytest.raises(errors.WorkdirError, match="is not writable"):
    loop.run(test_train.tiny_config(), str(blocker / "run"))


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(startup_checks.shutil, "disk_usage",
                      lambda p: usage._replace(free=1000))
  with pytest.raises(OSError, match=r"Only 0.00 GiB free .* one checkpoint needs"):
    loop.run(test_train.tiny_config(), str(tmp_path))


def test_config_changes_split_model_from_schedule():
  old = config_lib.to_dict(test_train.tiny_config())
  new = test_train.tiny_config()
  new.total_steps, new.optim.lr, new.model.embed_dim = 100, 0.1, 32
  model, other = startup_checks.config_changes(old, config_lib.to_dict(new))
  assert model == ["model.embed_dim: 16 -> 32"]
  assert other == ["optim.lr: 0.001 -> 0.1", "total_steps: 8 -> 100"]
  assert startup_checks.config_changes(old, old) == ([], [])


def test_a_new_option_left_at_its_default_is_no_change():
  """A workdir saved before an option existed resumes when the option is off."""
  old = config_lib.to_dict(test_train.tiny_config())
  del old["model"]["image"]["token_reduction"]
  defaults = config_lib.to_dict(config_lib.default_config())
  new = test_train.tiny_config()
  assert startup_checks.config_changes(old, config_lib.to_dict(new), defaults) == (
      [], [])
  new.model.image.token_reduction.method = "tome"
  model, _ = startup_checks.config_changes(old, config_lib.to_dict(new), defaults)
  assert model == ["model.image.token_reduction.method: '<absent>' -> 'tome'"]


def test_bad_fault_tolerance_config_is_a_clear_error():
  for key, value, msg in [("nonfinite", "ignore", "'halt' or 'skip'"),
                          ("best_metric", "eval/nope/top1", "evaluator 'nope'"),
                          ("best_mode", "up", "'max' or 'min'"),
                          ("frozen", ["img/("], "invalid regex")]:
    c = test_train.tiny_config()
    c[key] = value
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
      validation.validate(c)


def test_resume_drops_rows_past_the_checkpoint_and_a_half_written_line(tmp_path):
  """After a SIGKILL, metrics.jsonl may hold rows past the checkpoint and a cut line."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                          for s in range(1, 6)) + '{"step": 6, "lo')
  writer = metrics_lib.MetricWriter(str(tmp_path), True, resume_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(path))] == [1, 2, 3, 4]
  path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')  # Corruption mid-file is an error.
  with pytest.raises(json.JSONDecodeError):
    metrics_lib.read_metrics(str(path))


_jitted_flags = jax.jit(nonfinite.flags, static_argnums=2)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, None])
def test_flags_match_a_per_leaf_reference(value):
  """The one-norm gradient check flags exactly what a per-leaf isfinite loop flags."""
  rng = np.random.default_rng(0)
  grads = {"a": rng.standard_normal((3, 4)).astype(np.float32),
           "b": {"c": rng.standard_normal(5).astype(np.float32),
                 "d": rng.standard_normal((2, 2)).astype(np.float32)}}
  metrics = {"loss": np.float32(1.0), "clip/loss": np.float32(1.0),
             "caption/loss": np.float32(2.0)}
  if value is not None:
    leaf = ["a", "c", "d"][rng.integers(3)]
    target = grads[leaf] if leaf == "a" else grads["b"][leaf]
    target.flat[rng.integers(target.size)] = value
    metrics["caption/loss"] = np.float32(value)
  # Jitted, as in the train step (one compile for every case, not one per operation).
  got = np.asarray(_jitted_flags(metrics, grads, ("clip", "caption")))
  grads_bad = not all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  caption_bad = not np.isfinite(metrics["caption/loss"])
  want = [grads_bad or caption_bad, grads_bad, False, caption_bad]
  assert got.tolist() == want
