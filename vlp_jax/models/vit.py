"""Vision Transformer image tower with big_vision-style named sizes."""
from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers, reducing_encoder
from vlp_jax.models import token_reduction as tr

# name -> (width, depth, mlp_dim, num_heads), as in big_vision.
VIT_SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def parse_variant(variant: Optional[str]):
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  if not variant:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VIT_SIZES:
    raise ValueError(f"Unknown ViT size '{name}' in variant '{variant}'; "
                     f"known sizes: {sorted(VIT_SIZES)} (or set width/depth/mlp_dim/"
                     "num_heads explicitly).")
  width, depth, mlp_dim, heads = VIT_SIZES[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    out["patch_size"] = int(patch)
  return out


def num_kept_patches(n: int, patch_dropout: float) -> int:
  """How many of `n` patch tokens patch dropout keeps (at least one)."""
  return max(1, int(round(n * (1.0 - patch_dropout))))


def patch_keep_indices(rng, batch: int, n: int, patch_dropout: float):
  """[batch, k] sorted indices of a uniformly random subset of k of n patches per example."""
  noise = jax.random.uniform(rng, (batch, n))
  keep = jnp.argsort(noise, axis=1)[:, :num_kept_patches(n, patch_dropout)]
  return jnp.sort(keep, axis=1)


def resize_positions(pos, grid):
  """[1, g*g, W] position table of a square g x g patch grid -> [1, gh*gw, W] for
  `grid` = (gh, gw), bicubic (jax.image.resize, antialiased when shrinking), as DINO
  and SILC feed their smaller local crops."""
  n, width = pos.shape[1], pos.shape[2]
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f"Cannot resize a position table of {n} patches: it is not a "
                     "square grid.")
  out = jax.image.resize(pos.reshape(g, g, width), (grid[0], grid[1], width), "bicubic")
  return out.reshape(1, grid[0] * grid[1], width)


class ViT(nn.Module):
  """ViT: patchify (reshape + matmul), learned positions, pre-LN encoder, pooling.

  Returns (pooled [B, W], tokens [B, N, W]); `pool` is 'cls', 'gap', 'map' or 'none'
  (pooled is None). `ln_pre` adds a LayerNorm (param `ln_pre`) over the tokens after
  positions and the class token (OpenAI / open_clip ViTs). The class token gets no
  position embedding (a checkpoint's position 0 is folded into it on import). With `patch_dropout` p > 0 (FLIP), training keeps a random subset
  of round(N (1 - p)) patch tokens per example (positions added first; the class token
  is always kept); evaluation sees every patch. A `mask` (masked image modelling:
  TIPS / SigLIP 2, `masked_outputs.py`) replaces chosen embedded patches by a learned
  mask token. Images of another size than the first call's (local crops) use the
  position table resized to their patch grid. `token_reduction` (a
  `token_reduction.TokenReduction`, None = off) merges (ToMe) or selects (EViT)
  tokens inside the encoder (same params); the returned tokens are then the reduced
  ones, pool 'gap' is the size-weighted mean, and the token sizes are sown as
  intermediates/token_sizes.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  pool: str = "cls"
  dtype: Any = jnp.float32
  dropout: float = 0.0
  patch_dropout: float = 0.0
  ln_pre: bool = False
  final_norm: bool = True  # False: no LayerNorm after the last block (open_clip CoCa).
  opts: layers.TransformerOptions = layers.TransformerOptions()
  token_reduction: Any = None

  @nn.compact
  def __call__(self, images, train: bool = False, mask=None):
    """`mask` ([B, N] bool, optional; True = masked): those embedded patches are
    replaced by the learned `mask_token` (param created only on this path) before the
    positions are added (iBOT / DINOv2 / TIPS order); patch dropout is then off."""
    reducing = self.token_reduction is not None and self.token_reduction.on
    if reducing and mask is not None:
      raise ValueError("Token reduction cannot run with a patch mask (the masked "
                       "pass needs every patch position); turn one of them off.")
    p = self.patch_size
    b, h, w, c = images.shape
    if h % p or w % p:
      raise ValueError(f"Image size {h}x{w} is not divisible by patch size {p}.")
    patches = einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)",
                               p1=p, p2=p).astype(self.dtype)
    n = patches.shape[1]
    # The table's size is fixed by the first (initialising) call; images of another
    # size (e.g. 96 px local crops) get it resized (`resize_positions`).
    table = n
    if self.has_variable("params", "pos_embedding"):
      table = nn.meta.unbox(self.get_variable("params", "pos_embedding")).shape[1]
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1 / self.width ** 0.5), (None, "length", "embed")),
                     (1, table, self.width), jnp.float32)
    if table != n:
      pos = resize_positions(pos, (h // p, w // p))
    pos = jnp.broadcast_to(pos, (b, n, self.width))
    if train and self.patch_dropout > 0 and mask is None:
      # Dropping raw patches and their positions before the (per-token) embedding
      # equals embedding, adding positions, then dropping -- and skips the dropped work.
      keep = patch_keep_indices(self.make_rng("dropout"), b, n, self.patch_dropout)
      patches = jnp.take_along_axis(patches, keep[..., None], axis=1)
      pos = jnp.take_along_axis(pos, keep[..., None], axis=1)
    x = layers.dense(self.width, ("patch", "embed"), self.dtype, "embedding")(patches)
    if mask is not None:
      if mask.shape != (b, n):
        raise ValueError(f"mask has shape {mask.shape}; expected (batch, patches) = "
                         f"{(b, n)}.")
      token = self.param("mask_token", nn.with_logical_partitioning(  # iBOT: zeros.
          nn.initializers.zeros, (None, None, "embed")),
                         (1, 1, self.width), jnp.float32)
      x = jnp.where(mask[..., None], token.astype(self.dtype), x)
    x = x + pos.astype(self.dtype)
    if self.pool == "cls":
      cls = self.param("cls", nn.with_logical_partitioning(
          nn.initializers.zeros, (None, None, "embed")), (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x],
                          axis=1)
    if self.ln_pre:
      x = layers.layer_norm(self.dtype, "ln_pre", self.opts.layer_norm_eps)(x)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    size = None
    if reducing:
      x, size = reducing_encoder.ReducingEncoder(
          self.depth, self.num_heads, self.mlp_dim, self.token_reduction,
          class_token=self.pool == "cls", dtype=self.dtype, dropout=self.dropout,
          final_norm=self.final_norm, opts=self.opts, name="encoder")(x, train=train)
      if size is not None:
        self.sow("intermediates", "token_sizes", size)
    else:
      x = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype,
                             dropout=self.dropout, final_norm=self.final_norm,
                             opts=self.opts, name="encoder")(
                                 x, train=train)
    if self.pool == "cls":
      return x[:, 0], x[:, 1:]
    if self.pool == "gap":
      return tr.weighted_mean(x, size), x
    if self.pool == "map":
      pooled = layers.AttentionPool(self.num_heads, self.mlp_dim, 1, self.dtype,
                                    opts=self.opts, name="map_head")(x)
      return pooled[:, 0], x
    if self.pool == "none":
      return None, x
    raise ValueError(f"Unknown pool '{self.pool}'; use 'cls', 'gap', 'map' or 'none'.")
