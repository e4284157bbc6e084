"""The batch-sharded FILIP ring equals the dense loss; its memory is O(b), not O(B^2)."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from vlp_jax import sharding
from vlp_jax.objectives import sharded_filip
from vlp_jax.registry import OBJECTIVES

# name -> (mesh sizes, mesh axes the batch is split over).
MESHES = {
    "data8": ({"data": 8, "fsdp": 1, "tensor": 1}, ("data",)),
    "data2_fsdp4": ({"data": 2, "fsdp": 4, "tensor": 1}, ("data", "fsdp")),
}
SCALE = 10.0


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=1e-5, atol=1e-6)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tokens(batch, n=3, length=5, dim=8, seed=0):
  """Image tokens, text tokens (noisy copies of some image tokens, so some pairs
  match) and masks with 1..length real tokens."""
  rng = np.random.default_rng(seed)
  img = _unit(rng.normal(size=(batch, n, dim)))
  txt = _unit(rng.normal(size=(batch, length, dim)))
  txt[:, :n] = _unit(img + 1.5 * rng.normal(size=img.shape))
  mask = np.arange(length)[None] < rng.integers(1, length + 1, size=(batch, 1))
  return img.astype(np.float32), txt.astype(np.float32), mask.astype(np.float32)


def _outputs(img, txt, mask, scale):
  return {"image_token_emb": img, "text_token_emb": txt, "text_token_mask": mask,
          "logit_scale": scale}


def run_objective(cfg, img, txt, mask):
  """(loss, metrics), grads (image tokens, text tokens, scale), lowered text."""
  def loss_fn(img, txt, scale):
    return OBJECTIVES.get("filip")(_outputs(img, txt, mask, scale), {}, cfg)

  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))
  args = (img, txt, jnp.float32(SCALE))
  return fn(*args), fn.lower(*args).as_text()


@pytest.mark.parametrize("mesh_name,ls,block", [("data8", 0.0, 64),
                                                ("data2_fsdp4", 0.1, 1)])
def test_ring_matches_dense(mesh_name, ls, block):
  img, txt, mask = tokens(16)
  cfg = {"label_smoothing": ls, "block": block}
  # Without a mesh: the dense objective, the reference.
  ((ref_loss, ref_metrics), ref_grads), _ = run_objective(cfg, img, txt, mask)
  assert 0.0 < float(ref_metrics["i2t_acc"]) < 1.0
  assert 0.0 < float(ref_metrics["t2i_acc"]) < 1.0

  sizes, axes = MESHES[mesh_name]
  mesh = sharding.make_mesh(sizes)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P(axes))
    x, y, m = (jax.device_put(a, sh) for a in (img, txt, mask))
    ((loss, metrics), grads), text = run_objective(cfg, x, y, m)
  assert "stablehlo.collective_permute" in text and "manual_computation" in text
  assert_close(loss, ref_loss)
  assert metrics.keys() == ref_metrics.keys()
  jax.tree.map(assert_close, metrics, ref_metrics)
  jax.tree.map(assert_close, grads, ref_grads)
  # Every text row got its gradient back from the ring; pads get none.
  g_txt = np.asarray(grads[1])
  assert np.all(np.linalg.norm(g_txt, axis=-1)[mask > 0] > 0)
  assert np.all(g_txt[mask == 0] == 0)


def test_indivisible_batch_and_dense_option_use_the_dense_form():
  img, txt, mask = tokens(12)  # 12 rows do not split over 8 shards.
  with jax.set_mesh(sharding.make_mesh(MESHES["data8"][0])):
    for cfg, (x, y, m) in (({}, (img, txt, mask)),
                           ({"distributed": "dense"}, tokens(16))):
      fn = jax.jit(lambda o, cfg=cfg: OBJECTIVES.get("filip")(o, {}, cfg)[0])
      assert "collective_permute" not in fn.lower(_outputs(x, y, m, SCALE)).as_text()


def test_ring_needs_a_split_batch():
  img, txt, mask = tokens(8)
  with pytest.raises(ValueError, match="need batch mesh axes"):
    sharded_filip.filip_loss_ring(img, txt, mask, SCALE)
  with jax.set_mesh(sharding.make_mesh(MESHES["data8"][0])):
    with pytest.raises(ValueError, match="not divisible"):
      sharded_filip.filip_loss_ring(img[:4], txt[:4], mask[:4], SCALE)


@pytest.mark.slow  # Two compiles of the ring's backward pass (~7 s on 2 cores).
def test_ring_memory_grows_linearly_with_the_batch():
  """Compile only: with `block` text rows per chunk the per-device temporaries grow
  about linearly in B at a fixed shard count (one [b, block, N, L] chunk per round,
  the received text blocks saved for the backward pass), far below the dense
  [B, B, N, L] similarity tensor, which grows fourfold per doubling."""
  n, length, dim, block = 32, 16, 8, 4
  mesh = sharding.make_mesh(MESHES["data8"][0])
  temps = {}
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P("data"))
    for big_b in (32, 64):
      args = [jax.ShapeDtypeStruct(s, t, sharding=sh) for s, t in (
          ((big_b, n, dim), jnp.float32), ((big_b, length, dim), jnp.float32),
          ((big_b, length), jnp.float32))]
      fn = jax.jit(jax.value_and_grad(
          lambda x, y, m, s: sharded_filip.filip_loss_ring(x, y, m, s, block=block)[0],
          argnums=(0, 1, 3)))
      compiled = fn.lower(*args, jax.ShapeDtypeStruct((), jnp.float32)).compile()
      temps[big_b] = compiled.memory_analysis().temp_size_in_bytes
  dense_sim = 64 * 64 * n * length * 4  # One [B, B, N, L] float32 tensor at B = 64.
  assert temps[64] < 2.5 * temps[32], temps
  assert temps[64] < dense_sim / 8, (temps, dense_sim)
  print(f"ring temp bytes per device: {temps}; dense [B, B, N, L] at B=64: "
        f"{dense_sim}")
