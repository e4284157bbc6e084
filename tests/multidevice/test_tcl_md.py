"""TCL on 8 simulated devices: a sharded run equals the single-device one for a few
steps (losses, every parameter, the momentum teacher and the memory queue)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import test_train
from vlp_jax.data import pipeline
from vlp_jax.train import loop

MESH = {"data": 2, "fsdp": 4, "tensor": 1}
STEPS = 3  # 3 x 8 rows into a 32-row queue: the pointer has moved, nothing wrapped.


def tcl_config():
  """Tiny two-tower (32 px at patch 8: a 4 x 4 grid, 2 x 2 pooled locals) with TCL's
  pieces: one momentum view, an EMA of every parameter, 32-row queues."""
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.model.text.update(causal=False, pool="first", padding_mask=True)
  c.data.views = {"aug": {"count": 1, "crop_scale": [0.2, 1.0], "flip": True,
                          "color_jitter": [0.4, 0.4, 0.4, 0.1], "grayscale": 0.2,
                          "blur": 0.5}}
  c.teacher.update(params=[".*"], momentum=0.9, schedule="constant")
  c.queue.update(size=32, entries={"image": "teacher_view_emb/aug",
                                   "text": "teacher_text_emb"})
  c.objectives = {"tcl": 1.0}
  c.objective_cfg = {"tcl": {"alpha": 0.4, "alpha_warmup_steps": 2}}
  return c


def train(mesh, devices, batches):
  config = tcl_config()
  config.mesh = mesh
  exp = loop.Experiment(config, "/unused", devices)
  state, metrics = exp.create_state(), []
  init_queue = jax.device_get(state.queue)
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    for b in batches:
      state, m = exp.step_fn(state, exp.global_batch(b))
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()
                      if np.ndim(v) == 0})
  return exp, state, metrics, init_queue


@pytest.mark.slow
def test_tcl_on_a_mesh_matches_one_device():
  assert jax.device_count() == 8
  config = tcl_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batches = [pipeline.split_bad_counts(next(it))[0] for _ in range(STEPS)]
  _, state, metrics, init_queue = train(MESH, jax.devices(), batches)
  _, ref_state, ref_metrics, _ = train({"data": 1, "fsdp": 1, "tensor": 1},
                                       jax.devices()[:1], batches)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for name in ("loss", "tcl/cma_i2t", "tcl/cma_t2i", "tcl/imc_i2i", "tcl/imc_t2t",
               "tcl/lmi_image", "tcl/lmi_text", "tcl/alpha"):
    close([m[name] for m in metrics], [m[name] for m in ref_metrics])
  jax.tree.map(close, jax.device_get(state.params), jax.device_get(ref_state.params))
  jax.tree.map(close, jax.device_get(state.teacher), jax.device_get(ref_state.teacher))
  queue, ref_queue = jax.device_get(state.queue), jax.device_get(ref_state.queue)
  jax.tree.map(close, queue, ref_queue)
  # The queue really filled: STEPS x 8 rows written, the rest still the initial rows.
  assert int(queue["ptr"]) == STEPS * 8
  for name in ("image", "text"):
    assert not np.allclose(queue[name][:STEPS * 8], init_queue[name][:STEPS * 8])
    np.testing.assert_array_equal(queue[name][STEPS * 8:], init_queue[name][STEPS * 8:])
  # Rows are sharded over the data-parallel devices, not replicated.
  assert "data" in str(state.queue["image"].sharding.spec)
