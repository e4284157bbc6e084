"""On 8 simulated devices PyramidCLIP equals one device: the objective's sharded form
equals its dense form (value, metrics, gradient), and three train steps of a tiny
two-tower with the local image view and the short text view give the single-device
losses and every parameter (slow)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from tests.multidevice import test_distributed_losses as dl
from tests.multidevice import test_sharded_train as st
from vlp_jax.registry import OBJECTIVES

BATCH, K = 16, 2
LOCAL, SHORT = "view_emb/local", "text_view_emb/short"


@functools.cache
def _fn():
  objective = OBJECTIVES.get("pyramidclip")
  cfg = {"negative_smoothing": 0.2, "peer_weight": 0.5, "cross_weight": 1.5}
  return jax.jit(jax.value_and_grad(lambda o: objective(o, {}, cfg), has_aux=True))


def _outputs():
  img, txt = dl.embeddings(BATCH, dim=8, seed=5, noise=0.7)
  loc, short = dl.embeddings(BATCH * K, dim=8, seed=6, noise=0.7)
  return {"image_emb": img, "text_emb": txt, LOCAL: loc.reshape(BATCH, K, 8),
          SHORT: short[:BATCH], "logit_scale": np.float32(dl.SCALE)}


def test_sharded_objective_matches_dense():
  assert jax.device_count() == 8
  out = _outputs()
  (ref_loss, ref_metrics), ref_grads = jax.device_get(_fn()(out))
  mesh = dl.mesh_for("data8")
  with jax.set_mesh(mesh):
    keys = [k for k in out if k != "logit_scale"]
    sharded = dict(zip(keys, dl.on_mesh(mesh, ("data",), *[out[k] for k in keys])))
    sharded["logit_scale"] = jnp.float32(dl.SCALE)
    assert "manual_computation" in _fn().lower(sharded).as_text()  # Sharded form ran.
    (loss, metrics), grads = _fn()(sharded)
  dl.assert_close(loss, ref_loss)
  jax.tree.map(dl.assert_close, metrics, ref_metrics)
  jax.tree.map(dl.assert_close, grads, ref_grads)


def pyramid_config():
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.objectives = {"pyramidclip": 1.0}
  c.data.crop_scale = [0.9, 1.0]
  c.data.views = {"local": {"count": 1, "crop_scale": [0.5, 1.0]}}
  c.data.text_views = {"short": {"kind": "first_words", "words": 3}}
  return c


# Two train-step compilations (~40 s of CPU): `make test-all`. The fast suite keeps
# the objective's sharded-vs-dense check above; the mesh train step itself is
# covered fast for siglip in test_sharded_train.py.
@pytest.mark.slow
def test_train_steps_on_a_mesh_match_one_device():
  batches, (losses, params), (ref_losses, ref_params) = st.mesh_and_single_device(
      pyramid_config)
  assert batches[0]["views/local"].shape == (8, 1, 32, 32, 3)
  st.assert_close(losses, ref_losses)
  jax.tree.map(st.assert_close, params, ref_params)
  assert not np.allclose(ref_losses[0], ref_losses[-1])  # Training moved the params.
