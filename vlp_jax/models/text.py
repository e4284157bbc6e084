"""Text transformer tower: causal (CLIP) or bidirectional, with padding masks."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlp_jax.models import layers

PAD_ID = 0


def padding_mask(tokens):
  """[B, L] tokens -> [B, 1, 1, L] boolean key mask (True = real token)."""
  return (tokens != PAD_ID)[:, None, None, :]


def pool_tokens(x, tokens, pool: str):
  """Pools [B, L, W] features: 'eos' = last non-pad token, 'first', or masked 'mean'."""
  valid = tokens != PAD_ID
  if pool == "eos":
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  if pool == "first":
    return x[:, 0]
  if pool == "mean":
    w = valid[..., None].astype(x.dtype)
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
  raise ValueError(f"Unknown text pool '{pool}'; use 'eos', 'first' or 'mean'.")


class TextTransformer(nn.Module):
  """Token + position embeddings and a pre-LN transformer.

  Returns (pooled [B, W], tokens [B, L, W]). With `causal`, pooling at the EOS token
  (the last non-pad one) sees the whole caption, as in CLIP.
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  context_length: int
  causal: bool = True
  pool: str = "eos"
  dtype: Any = jnp.float32
  dropout: float = 0.0
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    b, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"Text length {length} exceeds context_length "
                       f"{self.context_length}.")
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     param_dtype=jnp.float32, name="token_embedding",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), (None, "length", "embed")),
                     (1, self.context_length, self.width), jnp.float32)
    x = embed(tokens) + pos[:, :length].astype(self.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype,
                           causal=self.causal, dropout=self.dropout, opts=self.opts,
                           name="encoder")(
                               x, mask=padding_mask(tokens), train=train)
    return pool_tokens(x, tokens, self.pool), x
