"""The momentum (EMA) teacher: update rule and schedule against a NumPy loop, no
gradient and no optimizer state, teacher outputs for objectives (with accumulation),
checkpoints (bitwise resume, older checkpoints, mismatches), init_from, config."""
import math
import os
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from vlp_jax import errors, validation
from vlp_jax.data import pipeline
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import checkpoint, freeze, init_from, loop, teacher as teacher_lib

# One set-up per config for the module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_compilations")

# The image tower and the text encoder (not its projection: the teacher's text
# embedding is the student's projection of the teacher's encoder).
TOWER = ["img/.*", "img_proj/.*", "txt/.*"]


def probe(kind):
  """Test-only objective (BYOL-like): student `kind` embeddings regress the teacher's."""
  def fn(outputs, batch, cfg):
    del batch, cfg
    d = outputs[f"{kind}_emb"] - outputs[f"teacher_{kind}_emb"]
    loss = jnp.mean(jnp.sum(d * d, -1))
    return loss, {"loss": loss}
  return fn


# A batch-global one and a per-example one (accumulation treats them differently).
OBJECTIVES.register("teacher_probe", replace=True, batch_global=True, reads=(
    "image_emb", "teacher_image_emb"))(probe("image"))
OBJECTIVES.register("teacher_probe_local", replace=True, reads=(
    "text_emb", "teacher_text_emb"))(probe("text"))


def teacher_config(**kw):
  """Tiny two-tower CLIP; EMA of TOWER (img_proj frozen); cosine momentum."""
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.objectives = {"clip": 1.0, "teacher_probe": 1.0, "teacher_probe_local": 1.0}
  c.frozen = ["img_proj/.*"]
  c.teacher.params = TOWER
  c.teacher.update(momentum=0.8, schedule="cosine", final_momentum=1.0)
  for k, v in kw.items():
    c[k] = v
  return c


def leaves_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                        jax.tree.leaves(b))))


def np_momentum(k, base, final, total, schedule):
  if schedule == "constant":
    return base
  return final - (final - base) * (math.cos(math.pi * min(k / total, 1.0)) + 1) / 2


def host_batches(config, n):
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  return [pipeline.split_bad_counts(next(it))[0] for _ in range(n)]


def run_steps(exp, state, batches):
  """Host copies of the state before the first and after every step, and metrics."""
  states, metrics = [jax.device_get(state)], []
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    for b in batches:
      state, m = exp.step_fn(state, exp.global_batch(b))
      states.append(jax.device_get(state))
      metrics.append(jax.device_get(m))
  return state, states, metrics


@pytest.fixture(scope="module")
def trained():
  """Four steps of teacher_config from its init: (exp, host states, metrics)."""
  config = teacher_config()
  exp = loop.Experiment(config, "/unused")
  state = exp.create_state()
  _, states, metrics = run_steps(exp, state, host_batches(config, 4))
  return exp, states, metrics


def test_ema_and_schedule_match_a_numpy_loop(trained):
  exp, states, metrics = trained
  t = exp.config.teacher
  # Created equal to the parameters it copies.
  teacher = teacher_lib.like(states[0].params, states[0].teacher)
  assert leaves_equal(states[0].teacher, teacher)
  assert sorted(states[0].teacher) == ["img", "img_proj", "txt"]
  for k in range(len(metrics)):
    m = np_momentum(k, t.momentum, t.final_momentum, exp.config.total_steps, t.schedule)
    np.testing.assert_allclose(metrics[k]["teacher_momentum"], m, rtol=1e-6)
    theta = teacher_lib.like(states[k + 1].params, teacher)
    teacher = jax.tree.map(lambda a, b: np.float32(m) * a + np.float32(1 - m) * b,
                           teacher, theta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 states[k + 1].teacher, teacher)
    assert int(states[k + 1].step) == k + 1
  # The teacher lags the trained tower; the frozen projection's copy stays bitwise.
  img_t, img_p = states[-1].teacher["img"], states[-1].params["img"]
  assert not leaves_equal(img_t, img_p) and not leaves_equal(img_t, states[0].params["img"])
  assert leaves_equal(states[-1].teacher["img_proj"], states[0].params["img_proj"])


def test_momentum_schedules():
  c = test_train.tiny_config(total_steps=100)
  c.teacher.update(params=[".*"], momentum=0.99, schedule="constant")
  assert [float(teacher_lib.momentum_schedule(c)(k)) for k in (0, 50, 100)] == [
      np.float32(0.99)] * 3
  c.teacher.update(schedule="cosine", final_momentum=1.0)
  got = [float(teacher_lib.momentum_schedule(c)(k)) for k in (0, 25, 50, 100, 150)]
  want = [np_momentum(k, 0.99, 1.0, 100, "cosine") for k in (0, 25, 50, 100, 150)]
  np.testing.assert_allclose(got, want, rtol=1e-7)
  assert got[0] == np.float32(0.99) and got[-2] == got[-1] == 1.0
  c.teacher.params = []
  assert teacher_lib.momentum_schedule(c) is None


def test_teacher_is_outside_the_gradient_and_the_optimizer(trained):
  exp, states, _ = trained
  opt_paths = [jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_leaves_with_path(states[0].opt_state)]
  params_only = jax.eval_shape(exp.tx.init, states[0].params)
  assert len(opt_paths) == len(jax.tree.leaves(params_only))
  assert not any("teacher" in p for p in opt_paths)
  # No gradient reaches the teacher, nor the student through the teacher's pass.
  batch = dict(host_batches(exp.config, 1)[0], step=0)
  names = teacher_lib.needed_outputs(exp.objectives)
  assert names == ("teacher_image_emb", "teacher_text_emb")

  def through_teacher(params, teacher):
    out = teacher_lib.outputs(exp.model, params, teacher, batch, names)
    return sum(jnp.sum(jnp.sin(v)) for v in out.values())
  g_params, g_teacher = jax.jit(jax.grad(through_teacher, argnums=(0, 1)))(
      states[-1].params, states[-1].teacher)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves((g_params, g_teacher)))


def test_teacher_outputs_use_the_teacher_params(trained):
  exp, states, metrics = trained
  state = states[-1]
  batch = host_batches(exp.config, 1)[0]
  got = teacher_lib.outputs(exp.model, state.params, state.teacher, batch,
                            ("teacher_image_emb", "teacher_text_emb"))
  merged = dict(state.params, **state.teacher)
  want = exp.model.apply({"params": merged}, batch, train=False)
  np.testing.assert_allclose(got["teacher_image_emb"], want["image_emb"], rtol=1e-6)
  np.testing.assert_allclose(got["teacher_text_emb"], want["text_emb"], rtol=1e-6)
  # Step 0: teacher == student (dropout 0), so the probe's loss starts at ~0.
  for name in ("teacher_probe", "teacher_probe_local"):
    assert metrics[0][f"{name}/loss"] < 1e-8 < metrics[-1][f"{name}/loss"]


def test_a_skipped_nonfinite_step_leaves_the_teacher_unchanged(trained):
  exp, states, _ = trained
  batch = dict(host_batches(exp.config, 1)[0])
  batch["image"] = np.array(batch["image"])
  batch["image"][0, 0, 0, 0] = np.inf  # NaN embeddings -> non-finite loss.
  state = jax.device_put(states[-1], exp.state_shardings)
  _, after, m = run_steps(exp, state, [batch])
  assert np.asarray(m[0]["nonfinite"])[0]
  assert leaves_equal(after[-1].teacher, states[-1].teacher)
  assert leaves_equal(after[-1].params, states[-1].params)


# `make test` covers this on a mesh: tests/multidevice/test_sharded_train.py's
# accumulation test carries a teacher and equals the full-batch step.
@pytest.mark.slow
def test_accumulation_updates_the_teacher_once_per_step(trained):
  """accum_steps=2 gives the full-batch step's params and teacher (teacher outputs
  per micro-batch, one EMA update), for batch-global and per-example objectives."""
  exp, states, _ = trained
  batch = host_batches(exp.config, 1)
  got, want = [], []
  for e, out in ((loop.Experiment(teacher_config(accum_steps=2), "/unused"), got),
                 (exp, want)):
    state = jax.device_put(states[-1], e.state_shardings)  # Teacher != params.
    _, s, m = run_steps(e, state, batch)
    out.extend([s[-1], m[-1]])
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, got[0].params, want[0].params)
  jax.tree.map(close, got[0].teacher, want[0].teacher)
  for name in ("teacher_probe", "teacher_probe_local"):
    close(got[1][f"{name}/loss"], want[1][f"{name}/loss"])
    assert got[1][f"{name}/loss"] > 0


def clip_config():
  """test_fault_tolerance's trained_clip config (one compiled step per session)."""
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.objectives = {"clip": 1.0}
  return c


def test_defaults_leave_the_state_and_step_unchanged():
  config = clip_config()
  assert not teacher_lib.enabled(config)
  exp = loop.Experiment(config, "/unused")
  assert exp.abstract.teacher is None and exp.teacher_momentum is None
  fields = {p[0].name for p, _ in jax.tree_util.tree_leaves_with_path(exp.abstract)}
  assert fields == {"step", "params", "opt_state", "rng"}

  @flax.struct.dataclass
  class PreTeacherState:  # The TrainState before teachers existed.
    step: jax.Array
    params: object
    opt_state: object
    rng: jax.Array
  old = PreTeacherState(*[getattr(exp.abstract, f) for f in
                          ("step", "params", "opt_state", "rng")])
  assert [p for p, _ in jax.tree_util.tree_leaves_with_path(old)] == [
      p for p, _ in jax.tree_util.tree_leaves_with_path(exp.abstract)]
  # (Every teacher-free test of the suite runs this state through the step.)


def test_pre_teacher_checkpoints_restore(tmp_path):
  """A checkpoint written by the TrainState before teachers existed restores."""
  config = clip_config()
  exp = loop.Experiment(config, str(tmp_path))
  state = exp.create_state()

  @flax.struct.dataclass
  class PreTeacherState:
    step: jax.Array
    params: object
    opt_state: object
    rng: jax.Array
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 2, PreTeacherState(state.step, state.params, state.opt_state,
                                              state.rng))
  manager.wait_until_finished()
  restored, step = checkpoint.restore(manager, exp.abstract)
  manager.close()
  assert step == 2 and restored.teacher is None
  assert leaves_equal(jax.device_get(restored), jax.device_get(state))


def test_resume_is_bitwise_with_the_teacher(tmp_path):
  """8 steps, checkpoints at 4 and 8; restart from 4 gives the same step-8 state."""
  config = teacher_config()
  final = jax.device_get(loop.run(config, str(tmp_path)))
  assert final.teacher is not None
  manager = checkpoint.make_manager(str(tmp_path), config)
  exp = loop.Experiment(config, str(tmp_path))
  saved, step = checkpoint.restore(manager, exp.abstract)
  manager.close()
  assert step == 8 and leaves_equal(jax.device_get(saved), final)
  for leaf, target in zip(jax.tree.leaves(saved.teacher),
                          jax.tree.leaves(exp.state_shardings.teacher)):
    assert leaf.sharding == target
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "8"))
  resumed = jax.device_get(loop.run(config, str(tmp_path)))
  assert leaves_equal(resumed, final)


def test_teacher_mismatch_with_the_checkpoint_is_a_clear_error(tmp_path):
  config = teacher_config()
  exp = loop.Experiment(config, str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 1, exp.create_state())
  manager.wait_until_finished()
  other = teacher_config()
  other.teacher.params = [".*"]
  for c in (other, clip_config()):
    c.frozen = ["img_proj/.*"]
    with pytest.raises(errors.CheckpointError, match=r"momentum teacher .* config\.teacher"):
      checkpoint.restore(manager, loop.Experiment(c, str(tmp_path)).abstract)
  manager.close()


def test_init_from_starts_the_teacher_from_the_loaded_params(tmp_path):
  config = teacher_config()
  exp = loop.Experiment(config, str(tmp_path))
  state = exp.create_state()
  state = state.replace(params=jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))(
      state.params))
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 5, state)
  manager.wait_until_finished()
  manager.close()
  loaded = jax.device_get(state.params)
  config.init_from.workdir = str(tmp_path)
  fresh = exp.create_state()
  new = init_from.apply(config.init_from, fresh, exp.tx, exp.state_shardings)
  assert leaves_equal(jax.device_get(new.params), loaded)
  assert leaves_equal(jax.device_get(new.teacher), teacher_lib.like(loaded, new.teacher))
  for leaf, target in zip(jax.tree.leaves(new.teacher),
                          jax.tree.leaves(exp.state_shardings.teacher)):
    assert leaf.sharding == target
  # Copies, not the parameters' buffers (the step donates both).
  kernel = lambda tree: tree["img_proj"]["proj"]["kernel"]
  assert (kernel(new.teacher).unsafe_buffer_pointer()
          != kernel(new.params).unsafe_buffer_pointer())


def test_config_errors():
  def check(change, error, match):
    c = teacher_config()
    change(c)
    with pytest.raises(error, match=match):
      validation.validate(c, evals=False)
  check(lambda c: c.teacher.update(momentum=1.5), errors.ConfigError,
        r"config\.teacher\.momentum=1\.5 must be a number in \[0, 1\]")
  check(lambda c: c.teacher.update(final_momentum=-0.1), errors.ConfigError,
        r"config\.teacher\.final_momentum=-0\.1 must be")
  check(lambda c: c.teacher.update(schedule="linear"), errors.ConfigError,
        r"schedule='linear' is not one of \['constant', 'cosine'\]")
  check(lambda c: c.teacher.update(params=["img/.*", 1]), errors.ConfigTypeError,
        r"config\.teacher\.params must be a list of regex strings")
  check(lambda c: c.teacher.update(params=["img/("]), errors.ConfigError, "invalid regex")
  check(lambda c: c.teacher.__setitem__("momentun", 0.9), errors.ConfigKeyError,
        r"config\.teacher\.momentun'\. Did you mean 'momentum'")
  check(lambda c: c.teacher.update(params=[]), errors.ConfigError,
        r"'teacher_probe' reads the momentum teacher's output 'teacher_image_emb', but "
        r"config\.teacher\.params is empty")
  c = teacher_config()
  c.teacher.params = ["img"]
  with pytest.raises(errors.ConfigError, match=r"'img' matches no parameter.*use 'img/\.\*'"):
    loop.Experiment(c, "/unused")


def test_select_like_and_merged_on_a_small_tree():
  params = {"a": {"k": np.ones(2), "b": np.zeros(1)}, "c": {"k": np.full(3, 2.0)}}
  t = teacher_lib.select(params, ["a/k", "c/.*"])
  assert jax.tree.structure(t) == jax.tree.structure({"a": {"k": 0}, "c": {"k": 0}})
  assert teacher_lib.select(params, [".*"]).keys() == params.keys()
  teacher = jax.tree.map(lambda x: x + 10, t)
  m = teacher_lib.merged(params, teacher)
  assert m["a"]["k"].tolist() == [11, 11] and m["a"]["b"].tolist() == [0]
  assert m["c"]["k"].tolist() == [12] * 3
  assert leaves_equal(teacher_lib.like(params, t), t)
  assert freeze.named_leaves(t).keys() == {"a/k", "c/k"}
