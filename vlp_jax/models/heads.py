"""Contrastive heads: projections and the learnable temperature / bias."""
import math

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models import layers


class Projection(nn.Module):
  """LayerNorm-free linear projection to the shared embedding space, L2-normalised.

  `use_bias` adds a bias (big_vision's / SigLIP's `head` Dense); `linear=False` has
  no parameters: the pooled features themselves are normalised (SigLIP's image
  tower, whose MAP head output is the embedding; their width must be `embed_dim`).
  """
  embed_dim: int
  dtype: object = jnp.float32
  use_bias: bool = False
  linear: bool = True

  @nn.compact
  def __call__(self, x, normalize: bool = True):
    """`normalize=False`: the linear map alone (applied per token to [..., W])."""
    if self.linear:
      x = layers.dense(self.embed_dim, ("embed", "proj"), self.dtype, "proj",
                       use_bias=self.use_bias)(x)
    elif x.shape[-1] != self.embed_dim:
      raise ValueError(f"A tower without projection gives width {x.shape[-1]} "
                       f"embeddings, but model.embed_dim is {self.embed_dim}: set "
                       "embed_dim to the tower's width or turn its projection on.")
    return layers.l2_normalize(x) if normalize else x


def projection_kwargs(model_cfg, tower: str) -> dict:
  """`Projection` options of tower 'image' or 'text' from `config.model`
  (`proj_bias`; `image.proj` / `text.proj`, False = no projection)."""
  return dict(use_bias=bool(model_cfg.get("proj_bias", False)),
              linear=bool(model_cfg[tower].get("proj", True)))


def projection_macs(model_cfg, tower: str, width: int) -> int:
  """Per-sample multiply-adds of a tower's pooled projection (0 without one)."""
  return width * model_cfg.embed_dim if model_cfg[tower].get("proj", True) else 0


class TokenProjection(nn.Module):
  """Per-token linear projection [B, T, W] -> [B, T, D], L2-normalised per token
  (FILIP's token embeddings). Normalised in float32, returned in the compute dtype:
  these are [B, T, D] per modality, and FILIP itself runs the token-wise
  similarity in reduced precision (its section 3.1.2)."""
  embed_dim: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.embed_dim, ("embed", "proj"), self.dtype, "proj",
                     use_bias=False)(x)
    x = layers.l2_normalize(x).astype(self.dtype)
    return layers.constrain(x, ("batch", "length", "proj"))


class LogitScale(nn.Module):
  """Learnable t = exp(t') (clamped at `max_scale`) and optional bias b.

  CLIP: t' = log(1/0.07), no bias. SigLIP: t' = log 10, b = -10.
  """
  scale_init: float = math.log(1 / 0.07)
  max_scale: float = 100.0
  bias_init: float = 0.0
  use_bias: bool = False

  @nn.compact
  def __call__(self):
    init = lambda value: nn.with_logical_partitioning(
        nn.initializers.constant(value), ())
    t = self.param("logit_scale", init(self.scale_init), (), jnp.float32)
    out = {"logit_scale": jnp.minimum(jnp.exp(t), self.max_scale)}
    if self.use_bias:
      out["logit_bias"] = self.param("logit_bias", init(self.bias_init), (), jnp.float32)
    return out
