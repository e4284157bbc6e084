"""Batch-sharded CLIP/SigLIP losses equal the dense ones; their logits memory is bounded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from vlp_jax import sharding
from vlp_jax.objectives import contrastive
from vlp_jax.objectives import sharded as distributed
from vlp_jax.registry import OBJECTIVES

# name -> (mesh sizes, mesh axes the batch is split over).
MESHES = {
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, ("data",)),
    "data2_fsdp4": ({"data": 2, "fsdp": 4, "tensor": 1}, ("data", "fsdp")),
    "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, ("fsdp",)),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, ("data", "fsdp")),
}
SCALE, BIAS = 10.0, -5.0


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=1e-5, atol=1e-6)


def _normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings(batch, dim=16, seed=0, noise=1.0):
  """Image embeddings and noisy text copies: some pairs match, some do not."""
  rng = np.random.default_rng(seed)
  img = _normalise(rng.normal(size=(batch, dim)))
  txt = _normalise(img + noise * rng.normal(size=(batch, dim)))
  return img.astype(np.float32), txt.astype(np.float32)


def mesh_for(name):
  return sharding.make_mesh(MESHES[name][0])


def on_mesh(mesh, axes, *arrays):
  sh = NamedSharding(mesh, P(axes))
  return [jax.device_put(x, sh) for x in arrays]


def dense_clip(img, txt, scale, ls):
  return contrastive.clip_loss_from_embeddings(img, txt, scale, label_smoothing=ls)[0]


def dense_siglip(img, txt, scale, bias):
  return contrastive.siglip_loss_from_embeddings(img, txt, scale, bias)[0]


def test_batch_mesh_axes():
  assert distributed.batch_mesh_axes() == ()
  for name, (_, axes) in MESHES.items():
    with jax.set_mesh(mesh_for(name)):
      assert distributed.batch_mesh_axes() == axes, name
  # The batch is not split when only the tensor axis is larger than 1.
  with jax.set_mesh(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})):
    assert distributed.batch_mesh_axes() == ()
  # Rules from config (active flax logical axis rules) carry over.
  with jax.set_mesh(mesh_for("data2_fsdp4")):
    with nn.logical_axis_rules(sharding.rules_from_config({"batch": "fsdp"})):
      assert distributed.batch_mesh_axes() == ("fsdp",)
    with nn.logical_axis_rules(sharding.rules_from_config({"batch": ""})):
      assert distributed.batch_mesh_axes() == ()
    assert distributed.batch_mesh_axes((("batch", ("fsdp", "data")),)) == ("fsdp", "data")


@pytest.mark.parametrize("batch", [32, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_clip_local_matches_dense(mesh_name, ls, batch):
  img, txt = embeddings(batch, seed=batch)
  grad = jax.value_and_grad(dense_clip, argnums=(0, 1, 2))
  ref_loss, ref_grads = grad(img, txt, SCALE, ls)
  logits = SCALE * img @ txt.T
  ref_i2t = np.mean(np.argmax(logits, axis=1) == np.arange(batch))
  ref_t2i = np.mean(np.argmax(logits, axis=0) == np.arange(batch))
  assert 0.0 < ref_i2t < 1.0 and 0.0 < ref_t2i < 1.0  # Accuracies are informative.

  mesh = mesh_for(mesh_name)
  axes = MESHES[mesh_name][1]
  with jax.set_mesh(mesh):
    x, y = on_mesh(mesh, axes, img, txt)

    def loss_fn(x, y, s):
      loss, i2t, t2i = distributed.clip_loss_local(x, y, s, label_smoothing=ls, axes=axes)
      return loss, (i2t, t2i)

    (loss, (i2t, t2i)), grads = jax.jit(
        jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
            x, y, jnp.float32(SCALE))
  assert_close(loss, ref_loss)
  for g, ref in zip(grads, ref_grads):
    assert_close(g, ref)
  assert float(i2t) == pytest.approx(ref_i2t)
  assert float(t2i) == pytest.approx(ref_t2i)


@pytest.mark.parametrize("batch", [32, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_siglip_chunked_matches_dense(mesh_name, batch):
  img, txt = embeddings(batch, seed=batch + 1)
  grad = jax.value_and_grad(dense_siglip, argnums=(0, 1, 2, 3))
  ref_loss, ref_grads = grad(img, txt, SCALE, BIAS)

  mesh = mesh_for(mesh_name)
  axes = MESHES[mesh_name][1]
  with jax.set_mesh(mesh):
    x, y = on_mesh(mesh, axes, img, txt)
    fn = jax.jit(jax.value_and_grad(
        lambda *a: distributed.siglip_loss_chunked(*a, axes=axes), argnums=(0, 1, 2, 3)))
    loss, grads = fn(x, y, jnp.float32(SCALE), jnp.float32(BIAS))
  assert_close(loss, ref_loss)
  for g, ref in zip(grads, ref_grads):
    assert_close(g, ref)
  # The text gradient reached every row's owner (no row is left without gradient).
  assert np.all(np.linalg.norm(np.asarray(grads[1]), axis=-1) > 0)


def _objective_outputs(img, txt):
  return {"image_emb": img, "text_emb": txt, "logit_scale": jnp.float32(SCALE),
          "logit_bias": jnp.float32(BIAS)}


# Collectives in the lowered StableHLO: only the shard_map forms write them there (the
# dense form's collectives are added later, by the partitioner).
COLLECTIVE = {"clip": "stablehlo.all_gather", "siglip": "stablehlo.collective_permute"}


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("mesh_name", ["data8", "data2_fsdp2_tensor2"])
def test_objective_dispatches_to_distributed_form(mesh_name, name):
  img, txt = embeddings(32, seed=7)
  cfg = {"label_smoothing": 0.1} if name == "clip" else {}
  objective = OBJECTIVES.get(name)

  def run(mode, img, txt):
    def loss_fn(img, txt, scale, bias):
      outputs = {"image_emb": img, "text_emb": txt, "logit_scale": scale,
                 "logit_bias": bias}
      return objective(outputs, {}, dict(cfg, distributed=mode))

    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))
    args = (img, txt, jnp.float32(SCALE), jnp.float32(BIAS))
    return fn(*args), fn.lower(*args).as_text()

  # Without a mesh: the dense objective, the reference.
  (ref_loss, ref_metrics), ref_grads = run("auto", img, txt)[0]
  mesh = mesh_for(mesh_name)
  with jax.set_mesh(mesh):
    x, y = on_mesh(mesh, MESHES[mesh_name][1], img, txt)
    (auto, auto_text), (dense, dense_text) = run("auto", x, y), run("dense", x, y)
  assert COLLECTIVE[name] in auto_text and "manual_computation" in auto_text
  assert COLLECTIVE[name] not in dense_text and "manual_computation" not in dense_text
  for (loss, metrics), grads in (auto, dense):
    assert_close(loss, ref_loss)
    assert metrics.keys() == ref_metrics.keys()
    jax.tree.map(assert_close, metrics, ref_metrics)
    jax.tree.map(assert_close, grads, ref_grads)


def test_objective_falls_back_to_dense_for_indivisible_batch():
  img, txt = embeddings(36, seed=3)  # 36 rows do not split over 8 shards.
  ref, _ = OBJECTIVES.get("clip")(_objective_outputs(img, txt), {}, {})
  with jax.set_mesh(mesh_for("data8")):
    fn = jax.jit(lambda o: OBJECTIVES.get("clip")(o, {}, {})[0])
    outputs = _objective_outputs(img, txt)
    assert "all_gather" not in fn.lower(outputs).as_text()
    assert_close(fn(outputs), ref)


def test_objective_rejects_unknown_mode():
  img, txt = embeddings(8)
  with pytest.raises(ValueError, match="distributed='ring'"):
    OBJECTIVES.get("siglip")(_objective_outputs(img, txt), {}, {"distributed": "ring"})


def test_distributed_losses_need_a_split_batch():
  img, txt = embeddings(8)
  with pytest.raises(ValueError, match="need batch mesh axes"):
    distributed.clip_loss_local(img, txt, SCALE)
  with jax.set_mesh(mesh_for("data8")), pytest.raises(ValueError, match="not divisible"):
    distributed.siglip_loss_chunked(img[:4], txt[:4], SCALE, BIAS)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_logits_memory_is_bounded():
  """At B = 8192 over 8 shards (b = 1024), no device holds [B, B] logits (compile only)."""
  big_b, dim, n = 8192, 8, 8
  b = big_b // n
  full = big_b * big_b * 4  # One [B, B] float32 array.
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  emb = jax.ShapeDtypeStruct((big_b, dim), jnp.float32)

  dense_clip_temp = _temp_bytes(jax.value_and_grad(
      lambda x, y, s: dense_clip(x, y, s, 0.1), argnums=(0, 1, 2)), emb, emb, scalar)
  dense_siglip_temp = _temp_bytes(jax.value_and_grad(
      dense_siglip, argnums=(0, 1, 2, 3)), emb, emb, scalar, scalar)
  assert dense_clip_temp >= full and dense_siglip_temp >= full

  mesh = mesh_for("data8")
  with jax.set_mesh(mesh):
    emb = jax.ShapeDtypeStruct((big_b, dim), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
    clip_temp = _temp_bytes(jax.value_and_grad(
        lambda x, y, s: distributed.clip_loss_local(x, y, s, 0.1)[0],
        argnums=(0, 1, 2)), emb, emb, scalar)
    siglip_temp = _temp_bytes(jax.value_and_grad(
        distributed.siglip_loss_chunked, argnums=(0, 1, 2, 3)), emb, emb, scalar, scalar)
  # Local CLIP: about one [b, B] array per device; chunked SigLIP: a few [b, b] blocks.
  assert clip_temp < 1.5 * b * big_b * 4 < full / 4
  assert siglip_temp < 4 * b * b * 4 == full / 16
  print(f"temp bytes per device at B={big_b}: dense clip {dense_clip_temp}, "
        f"dense siglip {dense_siglip_temp}, local clip {clip_temp}, "
        f"chunked siglip {siglip_temp}; [B, B] f32 = {full}")


def test_axis_order_fsdp_major():
  """Batch split as ('fsdp', 'data'): shard order follows the axes' order."""
  img, txt = embeddings(32, seed=11)
  ref_clip = jax.value_and_grad(dense_clip, argnums=(0, 1))(img, txt, SCALE, 0.0)
  ref_siglip = jax.value_and_grad(dense_siglip, argnums=(0, 1))(img, txt, SCALE, BIAS)
  mesh, axes = mesh_for("data2_fsdp4"), ("fsdp", "data")
  with jax.set_mesh(mesh):
    x, y = on_mesh(mesh, axes, img, txt)
    got_clip = jax.jit(jax.value_and_grad(
        lambda x, y: distributed.clip_loss_local(x, y, SCALE, axes=axes)[0],
        argnums=(0, 1)))(x, y)
    got_siglip = jax.jit(jax.value_and_grad(
        lambda x, y: distributed.siglip_loss_chunked(x, y, SCALE, BIAS, axes=axes),
        argnums=(0, 1)))(x, y)
  jax.tree.map(assert_close, got_clip, ref_clip)
  jax.tree.map(assert_close, got_siglip, ref_siglip)
