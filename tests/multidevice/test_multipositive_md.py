"""On 8 simulated devices the sharded forms of `unicl`, `clip` with softened negatives
and `lightclip` equal their dense forms in value, metrics and gradient.

Labels and image ids put positives on different shards (a class on rows 0 and 13,
an image's captions on rows 7 and 8), so a caption id or a positive computed from
shard-local indices would differ from the dense loss.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.multidevice import test_distributed_losses as dl
from vlp_jax.objectives import multipositive
from vlp_jax.registry import OBJECTIVES

BATCH = 16
LABEL = np.array([3, 0, 0, 5, 0, 3, 0, 0, 0, 5, 0, 0, 7, 3, 0, 7], np.int32)
IMAGE_ID = np.array([1, 2, 3, 4, 5, 6, 7, 9, 9, 10, 11, 2, 12, 13, 14, 15], np.int32)
CASES = {
    "unicl": {"same_image": True, "negative_smoothing": 0.1},
    "clip": {"negative_smoothing": 0.2},
    "lightclip": {"final_smoothing": 0.3, "ramp_steps": 10},
}


def _batch(name):
  if name == "unicl":
    return {"label": LABEL, "image_id": IMAGE_ID}
  return {"step": np.int32(4)} if name == "lightclip" else {}


@functools.cache
def _fn(name, mode):
  objective, cfg = OBJECTIVES.get(name), dict(CASES[name], distributed=mode)

  def loss(img, txt, scale, batch):
    return objective({"image_emb": img, "text_emb": txt, "logit_scale": scale}, batch,
                     cfg)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _inputs():
  img, txt = dl.embeddings(BATCH, dim=8, seed=3, noise=0.7)
  return img, txt, np.float32(dl.SCALE)


@functools.cache
def _dense(name):
  """The dense objective without a mesh: the reference."""
  return jax.device_get(_fn(name, "auto")(*_inputs(), _batch(name)))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mesh_name", ["data8", "data2_fsdp4"])
def test_sharded_matches_dense(mesh_name, name):
  assert jax.device_count() == 8
  (ref_loss, ref_metrics), ref_grads = _dense(name)
  if name == "unicl":
    assert 1.0 < float(ref_metrics["positives"]) < 2.0
  mesh, axes = dl.mesh_for(mesh_name), dl.MESHES[mesh_name][1]
  with jax.set_mesh(mesh):
    img, txt = dl.on_mesh(mesh, axes, *_inputs()[:2])
    batch = _batch(name)
    if name == "unicl":
      batch = dict(zip(batch, dl.on_mesh(mesh, axes, *batch.values())))
    fn = _fn(name, "auto")
    args = (img, txt, jnp.float32(dl.SCALE), batch)
    assert "manual_computation" in fn.lower(*args).as_text()  # The sharded form ran.
    (loss, metrics), grads = fn(*args)
  dl.assert_close(loss, ref_loss)
  assert metrics.keys() == ref_metrics.keys()
  jax.tree.map(dl.assert_close, metrics, ref_metrics)
  jax.tree.map(dl.assert_close, grads, ref_grads)
  # Every row's owner got its gradient.
  assert np.all(np.linalg.norm(np.asarray(grads[1]), axis=-1) > 0)


def test_unicl_logits_memory_is_bounded():
  """At B = 8192 over 8 shards (b = 1024): about three [b, B] float32 arrays per
  device (logits, log-probabilities, targets), never [B, B] (compile only)."""
  big_b, n = 8192, 8
  b = big_b // n
  mesh = dl.mesh_for("data8")
  with jax.set_mesh(mesh):
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    emb = jax.ShapeDtypeStruct((big_b, 8), jnp.float32, sharding=sharded)
    ids = jax.ShapeDtypeStruct((big_b,), jnp.int32, sharding=sharded)
    fn = jax.value_and_grad(
        lambda x, y, s, lab, iid: multipositive.unicl_loss_local(
            x, y, s, lab, iid, same_image=True, negative_smoothing=0.1)[0],
        argnums=(0, 1, 2))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    temp = dl._temp_bytes(fn, emb, emb, scalar, ids, ids)  # pylint: disable=protected-access
  assert temp < 4 * b * big_b * 4 == big_b * big_b * 4 / 2
  print(f"unicl temp bytes per device at B={big_b}: {temp}; "
        f"[b, B] f32 = {b * big_b * 4}")
