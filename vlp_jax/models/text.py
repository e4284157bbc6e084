"""Text transformer tower: causal (CLIP) or bidirectional, with padding masks, and
optional prefix conditioning (Saito et al., arXiv 2206.01125)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers

PAD_ID = 0
# Prefix conditioning's data types (batch['data_type']): one learned prefix each.
CAPTION, CLASSIFICATION = 0, 1
NUM_DATA_TYPES = 2


def padding_mask(tokens):
  """[B, L] tokens -> [B, 1, 1, L] boolean key mask (True = real token)."""
  return (tokens != PAD_ID)[:, None, None, :]


def real_length(tokens):
  """[B, L] tokens -> [B]: positions up to and including the last non-pad token, so a
  pad id inside the text (CLIP's '!' is id 0) counts; 0 for an all-padding row."""
  valid = tokens != PAD_ID
  last = tokens.shape[1] - jnp.argmax(valid[:, ::-1], axis=1)
  return jnp.where(valid.any(axis=1), last, 0)


def sequence_length(length: int, prefix_length: int, context_length: int) -> int:
  """Positions the encoder sees for [B, length] tokens: the prefix is inserted and
  the whole is cut back to `context_length` (`insert_prefix`)."""
  return min(length + prefix_length, context_length)


def sequence_mask(tokens, prefix_length: int = 0, context_length: int = None):
  """[B, L] tokens -> [B, T] bool, True at the positions the encoder sees as real:
  the tokens' own mask without a prefix, else that of `insert_prefix`'s layout
  (T = `sequence_length`)."""
  valid = tokens != PAD_ID
  if not prefix_length:
    return valid
  length = tokens.shape[1]
  t = sequence_length(length, prefix_length, context_length)
  n = real_length(tokens)
  m = jnp.where(n > 0, jnp.minimum(n + prefix_length, t), 0)
  return jnp.arange(t)[None, :] < m[:, None]


def insert_prefix(x, prefix, tokens, context_length: int):
  """Token embeddings [B, L, W] with prefix vectors [B, P, W] inserted right after
  the first (BOS) token -> [B, T, W], T = `sequence_length(L, P, context_length)`.

  Layout of a row with n real tokens (BOS w_1 .. w_{n-2} EOS):
  BOS p_1 .. p_P w_1 .. w_{n-2} EOS, then padding. When n + P > T the last words
  before EOS are dropped, never EOS itself, so the last real position (where 'eos'
  pooling reads) is always the input's last real token. All-padding rows stay all
  padding (no prefix).
  """
  b, length, _ = x.shape
  p = prefix.shape[1]
  combined = jnp.concatenate([x[:, :1], prefix.astype(x.dtype), x[:, 1:]], axis=1)
  t = sequence_length(length, p, context_length)
  if t == length + p:  # Nothing can overflow: the layout is the concatenation.
    return combined
  n = real_length(tokens)
  m = jnp.where(n > 0, jnp.minimum(n + p, t), 0)[:, None]
  j = jnp.arange(t)[None, :]
  # Position m-1 reads the input's last real token (combined index n-1+p); the rest
  # keep their place, so a row that fits is unchanged.
  src = jnp.where((j == m - 1) & (n[:, None] > 1), n[:, None] - 1 + p, j)
  return jnp.take_along_axis(combined, jnp.broadcast_to(src, (b, t))[..., None], axis=1)


TEXT_POOLS = ("eos", "first", "mean", "argmax", "last")


def pool_tokens(x, tokens, pool: str):
  """Pools [B, L, W] features: 'eos' = last non-pad token, 'first', masked 'mean',
  'argmax' = the position of the highest token id (CLIP's end-of-text token, as
  OpenAI / open_clip / HF CLIP pool) or 'last' = the last position (SigLIP)."""
  return pool_features(x, tokens != PAD_ID, pool, tokens)


def pool_features(x, valid, pool: str, tokens=None, prefix_length: int = 0):
  """`pool_tokens` over [B, L, W] features whose real positions are `valid` [B, L].

  'argmax' needs the `tokens` [B, L0]; with a prefix of `prefix_length` vectors
  inserted after BOS its position moves by that many (at most to the last position,
  where `insert_prefix` keeps the last real token)."""
  if pool == "eos":
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  if pool == "first":
    return x[:, 0]
  if pool == "last":
    return x[:, -1]
  if pool == "mean":
    w = valid[..., None].astype(x.dtype)
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
  if pool == "argmax":
    if tokens is None:
      raise ValueError("text pool 'argmax' needs the token ids.")
    at = jnp.argmax(tokens, axis=1)
    if prefix_length:
      at = jnp.minimum(jnp.where(at > 0, at + prefix_length, at), x.shape[1] - 1)
    return jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
  raise ValueError(f"Unknown text pool '{pool}'; use one of {TEXT_POOLS}.")


def check_length(length: int, context_length: int) -> None:
  """Raises ValueError when `length` tokens exceed `context_length`."""
  if length > context_length:
    raise ValueError(f"Text length {length} exceeds context_length {context_length}.")


def positions(table, length: int, start=None):
  """Position embeddings [1, length, W] from `table` [1, context, W]: the first
  `length`, or (decoding) those from the traced index `start` on."""
  if start is None:
    return table[:, :length]
  return jax.lax.dynamic_slice_in_dim(table, jnp.asarray(start, jnp.int32), length,
                                      axis=1)


def token_embedding(vocab_size: int, width: int, dtype) -> nn.Embed:
  """The 'token_embedding' table (N(0, 0.02), float32 params); create it inside the
  text tower's compact `__call__`."""
  return nn.Embed(vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                  name="token_embedding",
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(stddev=0.02), ("vocab", "embed")))


class TextTransformer(nn.Module):
  """Token + position embeddings and a pre-LN transformer.

  Returns (pooled [B, W], tokens [B, T, W]). With `causal`, pooling at the EOS token
  (the last non-pad one) sees the whole caption, as in CLIP.

  With `prefix_length` P > 0 (prefix conditioning), a learned table of
  [NUM_DATA_TYPES, P, width] vectors (N(0, 0.02), as CoOp's context vectors) gives
  each example the P vectors of its `data_type` (0 caption, the default; 1
  classification prompt), inserted after BOS (`insert_prefix`); the sequence then
  has T = min(L + P, context_length) positions (`sequence_mask` says which are real).

  `padding_mask=False` masks no keys by pad id (only the causal mask, if any): CLIP's
  vocabulary has id 0 both as padding and as '!', and SigLIP pads with EOS; in a
  causal tower the output at the end token does not see the padding after it anyway.

  `cache_index` (not None, a causal tower without prefix): decoding with a KV cache
  (`layers.Attention`): `tokens` are the ones at positions `cache_index`.. and take
  those position embeddings; no padding mask (decoding feeds none before the end).
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
  prefix_length: int = 0
  padding_mask: bool = True
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, tokens, train: bool = False, data_type=None, cache_index=None):
    b, length = tokens.shape
    check_length(length, self.context_length)
    if cache_index is not None and (self.prefix_length or not self.causal):
      raise ValueError("Cached decoding needs a causal text tower without prefix "
                       "conditioning.")
    embed = token_embedding(self.vocab_size, self.width, self.dtype)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), (None, "length", "embed")),
                     (1, self.context_length, self.width), jnp.float32)
    x = embed(tokens)
    valid = sequence_mask(tokens, self.prefix_length, self.context_length)
    if self.prefix_length:
      table = self.param("prefix_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                         (NUM_DATA_TYPES, self.prefix_length, self.width), jnp.float32)
      if data_type is None:
        data_type = jnp.full((b,), CAPTION, jnp.int32)
      x = insert_prefix(x, table[jnp.asarray(data_type, jnp.int32)], tokens,
                        self.context_length)
    x = x + positions(pos, x.shape[1], cache_index).astype(self.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = valid[:, None, None, :] if self.padding_mask and cache_index is None else None
    x = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype,
                           causal=self.causal, dropout=self.dropout, opts=self.opts,
                           name="encoder")(x, mask=mask, train=train,
                                           cache_index=cache_index)
    return pool_features(x, valid, self.pool, tokens, self.prefix_length), x
