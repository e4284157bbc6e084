"""The memory queue: FIFO rule against a NumPy loop (with wrap-around and views),
what objectives see, sharding, skipped steps, checkpoints (bitwise resume,
mismatches), and config errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_teacher, test_train
from vlp_jax import errors, validation
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import checkpoint, loop, queue as queue_lib, teacher as teacher_lib

pytestmark = pytest.mark.usefixtures("shared_compilations")

B = 8  # tiny_config's batch.


@OBJECTIVES.register("queue_probe", replace=True, batch_global=True,
                     reads=("image_emb", "queue/image", "queue/text"))
def queue_probe(outputs, batch, cfg):
  """Test-only: MoCo-like negatives term; reports the queue it was given."""
  del batch, cfg
  q = outputs["queue/image"]
  loss = jnp.mean(jax.nn.logsumexp(outputs["image_emb"] @ q.T * 10.0, axis=-1))
  return loss, {"loss": loss, "image_sum": jnp.sum(q),
                "text_sum": jnp.sum(outputs["queue/text"])}


def queue_config(size=4 * B, **kw):
  c = test_teacher.clip_config()
  c.objectives = {"clip": 1.0, "queue_probe": 0.5}
  c.teacher.update(params=[".*"], momentum=0.5)
  c.queue.update(size=size, entries={"image": "teacher_image_emb",
                                     "text": "teacher_text_emb"})
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def trained():
  """Six steps (the 32-row queue wraps after four): (exp, batches, states, metrics)."""
  config = queue_config()
  exp = loop.Experiment(config, "/unused")
  batches = test_teacher.host_batches(config, 6)
  _, states, metrics = test_teacher.run_steps(exp, exp.create_state(), batches)
  return exp, batches, states, metrics


def teacher_embeddings(exp, state, batch):
  """The teacher's image/text embeddings of `batch`, by a plain forward pass."""
  params = teacher_lib.merged(state.params, state.teacher)
  out = exp.model.apply({"params": params}, batch, train=False)
  return {"image": np.asarray(out["image_emb"]), "text": np.asarray(out["text_emb"])}


def test_fifo_matches_a_numpy_loop(trained):
  exp, batches, states, metrics = trained
  q0 = states[0].queue
  assert sorted(q0) == ["image", "ptr", "text"] and int(q0["ptr"]) == 0
  for name in ("image", "text"):
    assert q0[name].shape == (32, 16) and q0[name].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q0[name], axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(q0["image"], q0["text"])
  ref = {k: np.array(q0[k]) for k in ("image", "text")}
  ptr = 0
  for k, batch in enumerate(batches):
    # The objective sees the queue before this step's rows go in.
    np.testing.assert_allclose(metrics[k]["queue_probe/image_sum"], ref["image"].sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics[k]["queue_probe/text_sum"], ref["text"].sum(),
                               rtol=1e-5)
    new = teacher_embeddings(exp, states[k], batch)
    for name in ("image", "text"):  # Oldest rows out: a plain loop over rows.
      for r in range(B):
        ref[name][(ptr + r) % 32] = new[name][r]
    ptr = (ptr + B) % 32
    got = states[k + 1].queue
    assert int(got["ptr"]) == ptr
    for name in ("image", "text"):
      np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=2e-6)
  assert ptr == 16  # Wrapped: six batches of 8 in 32 rows.


def test_queue_gets_no_gradient_and_no_optimizer_state(trained):
  exp, _, states, _ = trained
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(states[0].opt_state)]
  assert not any("queue" in p for p in paths)
  assert len(jax.tree.leaves(states[0].opt_state)) == len(
      jax.tree.leaves(jax.eval_shape(exp.tx.init, states[0].params)))


def test_params_init_does_not_depend_on_the_queue():
  with_q = loop.Experiment(queue_config(), "/unused").create_state()
  plain = test_teacher.clip_config()
  plain.teacher.update(params=[".*"], momentum=0.5)
  without = loop.Experiment(plain, "/unused").create_state()
  assert without.queue is None
  assert test_teacher.leaves_equal(jax.device_get(with_q.params),
                                   jax.device_get(without.params))


def test_a_skipped_nonfinite_step_leaves_the_queue_unchanged(trained):
  exp, batches, states, _ = trained
  batch = dict(batches[0])
  batch["image"] = np.array(batch["image"])
  batch["image"][0, 0, 0, 0] = np.inf  # NaN embeddings -> non-finite loss.
  state = jax.device_put(states[-1], exp.state_shardings)
  _, after, m = test_teacher.run_steps(exp, state, [batch])
  assert np.asarray(m[0]["nonfinite"])[0]
  assert test_teacher.leaves_equal(after[-1].queue, states[-1].queue)


def test_enqueue_views_and_wrap_around_on_arrays():
  """[B, K, D] outputs add B*K rows; a pointer that is not a multiple of the rows per
  step (batch size changed on resume) still overwrites the oldest rows, wrapping."""
  q = {"ptr": jnp.asarray(4, jnp.int32), "a": jnp.zeros((12, 3), jnp.float32)}
  v = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)
  new = queue_lib.enqueue(q, {"a": v})
  assert int(new["ptr"]) == 8
  np.testing.assert_array_equal(new["a"][4:8], np.arange(12).reshape(4, 3))
  np.testing.assert_array_equal(new["a"][:4], 0)
  q = {"ptr": jnp.asarray(8, jnp.int32), "a": jnp.zeros((12, 3), jnp.float32)}
  new = queue_lib.enqueue(q, {"a": v + 1})
  np.testing.assert_array_equal(new["a"][8:12], np.arange(12).reshape(4, 3) + 1)
  q = {"ptr": jnp.asarray(10, jnp.int32), "a": jnp.zeros((12, 3), jnp.float32)}
  new = queue_lib.enqueue(q, {"a": v + 1})
  np.testing.assert_array_equal(np.asarray(new["a"])[[10, 11, 0, 1]],
                                np.arange(12).reshape(4, 3) + 1)
  np.testing.assert_array_equal(new["a"][2:10], 0)
  assert int(new["ptr"]) == 2
  with pytest.raises(errors.ConfigError, match="multiple of the 5 rows"):
    queue_lib.enqueue(q, {"a": jnp.zeros((5, 3))})
  with pytest.raises(errors.ConfigError, match="dimension 3"):
    queue_lib.enqueue(q, {"a": jnp.zeros((4, 4))})


def test_resume_is_bitwise_with_the_queue(tmp_path):
  config = queue_config()
  final = jax.device_get(loop.run(config, str(tmp_path)))
  assert int(final.queue["ptr"]) == 0  # 8 steps x 8 rows in 32.
  exp = loop.Experiment(config, str(tmp_path))
  for leaf, target in zip(jax.tree.leaves(exp.create_state().queue),
                          jax.tree.leaves(exp.state_shardings.queue)):
    assert leaf.sharding == target
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "8"))
  resumed = jax.device_get(loop.run(config, str(tmp_path)))
  assert test_teacher.leaves_equal(resumed, final)


def test_queue_mismatch_with_the_checkpoint_is_a_clear_error(tmp_path):
  config = queue_config()
  exp = loop.Experiment(config, str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 1, exp.create_state())
  manager.wait_until_finished()
  smaller = queue_config(size=2 * B)
  no_queue = test_teacher.clip_config()
  no_queue.teacher.update(params=[".*"], momentum=0.5)
  for c in (smaller, no_queue):
    with pytest.raises(errors.CheckpointError, match=r"memory queue.*config\.queue"):
      checkpoint.restore(manager, loop.Experiment(c, str(tmp_path)).abstract)
  manager.close()


def test_config_errors():
  ok = queue_config()
  validation.validate(ok, evals=False)
  c = queue_config()
  c.teacher.params = []
  with pytest.raises(errors.ConfigError, match="teacher.params is empty"):
    validation.validate(c, evals=False)
  c = queue_config()
  c.queue.entries = {"image": "image_emb", "text": "teacher_text_emb"}
  with pytest.raises(errors.ConfigError, match="not a momentum-teacher output"):
    validation.validate(c, evals=False)
  c = queue_config()
  c.queue.entries = {"image": "teacher_image_emb"}
  with pytest.raises(errors.ConfigError, match=r"reads the queue 'queue/text'"):
    validation.validate(c, evals=False)
  c = queue_config()
  c.queue.entries = {"image": "teacher_view_emb/aug", "text": "teacher_text_emb"}
  with pytest.raises(errors.ConfigError, match="does not produce 'view_emb/aug'"):
    validation.validate(c, evals=False)
  c = queue_config()
  c.queue.size = -1
  with pytest.raises(errors.ConfigError, match="integer >= 0"):
    validation.validate(c, evals=False)
  c = queue_config()
  c.queue.size = 0
  with pytest.raises(errors.ConfigError, match="config.queue is off"):
    validation.validate(c, evals=False)
  c = test_train.tiny_config()
  assert not queue_lib.enabled(c) and queue_lib.init(c) is None
