"""KV-cached autoregressive decoding for captioners (`interface.Captioner`: CoCa):
the cache, one decode step, and the greedy and nucleus-sampling loops (beam search:
`beam_search.py`; the method dispatch: `generate.py`).

The model's `decode(tokens, context, cache_index=i)` runs the decoder on the tokens at
positions i.. with the keys/values of the earlier ones in the 'cache' collection
(`layers.Attention`): a step costs one position instead of the whole prefix, and the
image context's cross-attention keys/values are computed once, at the first step.
Everything has static shapes (a cache of `max_len` positions, `lax.while_loop`), so
the loops jit; the batch is split over the mesh's data axes when a mesh is active.
Outputs are int32 [B, max_len]: BOS, the continuation up to and including the first
EOS (or padding id, which also ends a caption), then padding.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax import sharding
from vlp_jax.models import beam_search


def batch_axes():
  """The active mesh's axes (size > 1) that the logical 'batch' axis maps to under
  the active logical rules, else `sharding.DEFAULT_RULES`; () without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
  entry = nn.logical_to_mesh_axes(("batch",), rules)[0] or ()
  entry = (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(a for a in entry if a in mesh.shape and mesh.shape[a] > 1)


def shard_batch(x):
  """`x` with its leading (batch) axis split over the mesh's data axes (`batch_axes`);
  unchanged without a mesh or when the batch does not divide."""
  axes = batch_axes()
  if not axes or x.shape[0] % math.prod(jax.sharding.get_abstract_mesh().shape[a]
                                        for a in axes):
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def encode(model, params, images):
  """The decoder's image context [B, Q, W] (`encode_image`), batch-sharded."""
  images = shard_batch(images)
  return shard_batch(model.apply({"params": params}, images, method="encode_image")[2])


def init_cache(model, params, context, max_len: int):
  """A zero KV cache for decoding `context.shape[0]` sequences of `max_len` tokens
  (its shapes from an abstract trace of a full-length decode call)."""
  tokens = jnp.zeros((context.shape[0], max_len), jnp.int32)
  fn = functools.partial(model.apply, method="decode", mutable=["cache"])
  shapes = jax.eval_shape(fn, {"params": params}, tokens, context,
                          cache_index=jnp.int32(0))[1]["cache"]
  return jax.tree.map(lambda s: shard_batch(jnp.zeros(s.shape, s.dtype)), shapes)


def step(model, params, cache, tokens, index, context=None):
  """Decodes `tokens` [B] at position `index` -> (next-token logits [B, V] float32,
  the updated cache). `context` on the first step only (then it is cached)."""
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                context, cache_index=index, method="decode",
                                mutable=["cache"])
  return logits[:, 0].astype(jnp.float32), mutated["cache"]


def _decode_loop(model, params, images, max_len, bos_id, eos_id, pad_id, pick):
  """Shared greedy/sampling loop: `pick(logits [B, V], t) -> [B]` chooses the token
  at position t + 1. Stops when every caption has ended."""
  context = encode(model, params, images)
  b = images.shape[0]
  cache = init_cache(model, params, context, max_len)
  tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  tokens = shard_batch(tokens)
  logits, cache = step(model, params, cache, tokens[:, 0], jnp.int32(0), context)

  def advance(t, logits, tokens, done):
    nxt = jnp.where(done, pad_id, pick(logits, t).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t + 1))
    return tokens, done | (nxt == eos_id) | (nxt == pad_id)

  tokens, done = advance(0, logits, tokens, jnp.zeros((b,), bool))

  def cond(carry):
    t, _, done, _ = carry
    return (t < max_len - 1) & ~jnp.all(done)

  def body(carry):
    t, tokens, done, cache = carry
    logits, cache = step(model, params, cache, tokens[:, t], t)
    tokens, done = advance(t, logits, tokens, done)
    return t + 1, tokens, done, cache

  _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))
  return tokens


def greedy(model, params, images, max_len: int, bos_id: int, eos_id: int,
           pad_id: int = 0):
  """Greedy decoding with the KV cache: int32 [B, max_len] (the module docstring)."""
  return _decode_loop(model, params, images, max_len, bos_id, eos_id, pad_id,
                      lambda logits, t: jnp.argmax(logits, axis=-1))


def nucleus_filter(logits, top_p: float):
  """Logits [..., V] with every token outside the nucleus set to -inf: the smallest
  set of most probable tokens whose probability reaches `top_p` (Holtzman et al.,
  2020; the most probable token is always kept, so top_p -> 0 is greedy)."""
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the more probable tokens.
  keep = (before < top_p).at[..., 0].set(True)
  cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample(model, params, images, key, max_len: int, bos_id: int, eos_id: int,
           pad_id: int = 0, top_p: float = 1.0, temperature: float = 1.0):
  """Nucleus (top-p) sampling at `temperature` with the KV cache: int32 [B, max_len].
  Step t draws with `fold_in(key, t)`, so a key gives the same captions every run."""
  def pick(logits, t):
    filtered = nucleus_filter(logits / temperature, top_p)
    return jax.random.categorical(jax.random.fold_in(key, t), filtered, axis=-1)
  return _decode_loop(model, params, images, max_len, bos_id, eos_id, pad_id, pick)


def beam(model, params, images, max_len: int, bos_id: int, eos_id: int,
         pad_id: int = 0, beam_size: int = 4, length_penalty: float = 0.6,
         return_scores: bool = False):
  """Beam search with the KV cache (`beam_search.py`: GNMT length penalty):
  int32 [B, max_len] (the best hypothesis of each image); with `return_scores`
  also their scores float32 [B] (log-probability / GNMT length penalty)."""
  b = images.shape[0]
  context = jnp.repeat(encode(model, params, images), beam_size, axis=0)
  cache = init_cache(model, params, context, max_len)
  first = lambda tokens: step(model, params, cache, tokens, jnp.int32(0), context)
  later = lambda cache, tokens, t: step(model, params, cache, tokens, t)
  tokens, scores = beam_search.beam_search(first, later, b, beam_size, max_len, bos_id,
                                           eos_id, pad_id, length_penalty,
                                           reorder_cache)
  return (tokens, scores) if return_scores else tokens


def reorder_cache(cache, rows):
  """The cache of the hypotheses `rows` [B * K] (each a row of the same example): the
  self-attention keys/values are gathered; the image context's ('context_key',
  'context_value') are the same for every beam of an example and stay."""
  def take(path, leaf):
    if getattr(path[-1], "key", None) in ("context_key", "context_value"):
      return leaf
    return jnp.take(leaf, rows, axis=0)
  return jax.tree_util.tree_map_with_path(take, cache)
