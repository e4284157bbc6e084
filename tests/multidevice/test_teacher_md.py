"""The momentum teacher on 8 simulated devices: sharded like the parameters it copies,
and a sharded run equals the single-device one (losses, parameters, teacher)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import test_teacher
from vlp_jax.data import pipeline
from vlp_jax.train import loop, teacher as teacher_lib

MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def train(mesh, devices, batches):
  config = test_teacher.teacher_config()
  config.mesh = mesh
  exp = loop.Experiment(config, "/unused", devices)
  state, losses = exp.create_state(), []
  init = jax.device_get(state.teacher)
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    for b in batches:
      state, m = exp.step_fn(state, exp.global_batch(b))
      losses.append(float(m["loss"]))
  return exp, state, np.array(losses), init


# `make test` checks the teacher on a mesh in test_sharded_train.py (siglip's fast case
# and its accumulation test carry an image-tower teacher); this fuller one is slow.
@pytest.mark.slow
def test_teacher_is_sharded_like_its_params_and_matches_one_device():
  assert jax.device_count() == 8
  config = test_teacher.teacher_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batches = [pipeline.split_bad_counts(next(it))[0] for _ in range(3)]
  exp, state, losses, init = train(MESH, jax.devices(), batches)
  # Declared and actual shardings of every teacher leaf are its parameter's.
  want = teacher_lib.like(exp.state_shardings.params, exp.state_shardings.teacher)
  assert jax.tree.leaves(exp.state_shardings.teacher) == jax.tree.leaves(want)
  got = [x.sharding for x in jax.tree.leaves(state.teacher)]
  assert got == jax.tree.leaves(want)
  assert any("fsdp" in str(s.spec) for s in got)  # Really sharded, not replicated.
  _, ref_state, ref_losses, _ = train({"data": 1, "fsdp": 1, "tensor": 1},
                                   jax.devices()[:1], batches)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  close(losses, ref_losses)
  jax.tree.map(close, jax.device_get(state.params), jax.device_get(ref_state.params))
  jax.tree.map(close, jax.device_get(state.teacher), jax.device_get(ref_state.teacher))
  # The teacher moved (the LR warms up from 0 at step 0, hence 3 steps).
  assert not np.allclose(jax.device_get(state.teacher["img"]["pos_embedding"]),
                         init["img"]["pos_embedding"])
