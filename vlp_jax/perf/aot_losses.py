"""Per-device memory of the sharded contrastive losses on a slice, compiled ahead of
time (tools/aot_compile.py --loss_batches): local CLIP and chunked SigLIP against
their dense forms, and FILIP's ring, at several global batches.

Each loss and its gradient is compiled alone, on [B, d] embeddings (FILIP: [B, n, d]
tokens) split over every device of the slice, and XLA's temporary bytes per device
are read. A dense form materialises [B, B] similarities; the sharded forms hold one
device's rows against one block at a time, so their memory per device follows the
per-device batch, not B squared.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp_jax import errors
from vlp_jax.objectives import contrastive, sharded, sharded_filip


def _temp_bytes(fn, *args) -> int:
  return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def loss_memory(devices, batch: int, dim: int, tokens: int = 16, token_dim: int = 0) -> dict:
  """{loss: temporary bytes per device} of each loss + gradient at global `batch` on
  `devices` (all on one batch axis), embeddings of width `dim`, FILIP with `tokens`
  tokens per image and per text of width `token_dim` (default `dim`)."""
  if batch % len(devices):
    raise errors.ConfigError(f"--loss_batches: {batch} does not split over the "
                             f"slice's {len(devices)} devices; use multiples of "
                             f"{len(devices)}.")
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
  tok = jax.ShapeDtypeStruct((batch, tokens, token_dim or dim), jnp.float32,
                             sharding=rows)
  mask = jax.ShapeDtypeStruct((batch, tokens), jnp.bool_, sharding=rows)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  axes = ("data",)
  grad = lambda f, n: jax.value_and_grad(f, argnums=tuple(range(n)))
  forms = {
      "clip_dense": (grad(lambda x, y, s: contrastive.clip_loss_from_embeddings(
          x, y, s)[0], 3), (emb, emb, scalar)),
      "clip_local": (grad(lambda x, y, s: sharded.clip_loss_local(
          x, y, s, axes=axes)[0], 3), (emb, emb, scalar)),
      "siglip_dense": (grad(lambda x, y, s, b: contrastive.siglip_loss_from_embeddings(
          x, y, s, b)[0], 4), (emb, emb, scalar, scalar)),
      "siglip_chunked": (grad(lambda x, y, s, b: sharded.siglip_loss_chunked(
          x, y, s, b, axes=axes), 4), (emb, emb, scalar, scalar)),
      "filip_ring": (grad(lambda x, y, s, m: sharded_filip.filip_loss_ring(
          x, y, m, s, axes=axes)[0], 2), (tok, tok, scalar, mask)),
  }
  out = {}
  with jax.set_mesh(mesh):
    for name, (fn, args) in forms.items():
      out[name] = _temp_bytes(fn, *args)
  out["pair_matrix_bytes"] = batch * batch * 4  # one [B, B] float32 array
  out["per_device_batch"] = batch // len(devices)
  return out


def loss_memory_table(devices, batches, dim: int, tokens: int = 16,
                      token_dim: int = 0) -> list:
  """[{'batch', ...loss_memory}] for each global batch in `batches`."""
  return [dict(batch=b, **loss_memory(devices, b, dim, tokens, token_dim))
          for b in batches]
