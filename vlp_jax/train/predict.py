"""Jitted inference functions handed to evaluators (`predict_fns`), from what every
model family provides (`models/interface.py`): `embed_image`, `embed_text`; for
families that generate, `encode_image` + `decode`; for families with per-token
embeddings turned on (FILIP, `interface.can_embed_tokens`), `embed_image_tokens`,
`embed_text_tokens` and `token_scores`, whose presence tells evaluators to score
with the token-wise similarity."""
import functools

import jax
import jax.numpy as jnp

from vlp_jax import decode_options, errors
from vlp_jax.models import generate, interface
from vlp_jax.objectives import filip


def make_predict_fns(model, tokenizer, context_length: int):
  """{'embed_image', 'embed_text', 'generate' (if the model decodes),
  'embed_image_tokens', 'embed_text_tokens', 'token_scores' (if it has token
  embeddings), 'tokenize', 'detokenize'}.

  `embed_text(params, tokens, data_type=None)`: `data_type` (an int, static) picks a
  prefix-conditioned model's prefix; None is the caption prefix, as the paper uses
  for zero-shot evaluation.
  """
  def embed_image(params, images):
    return model.apply({"params": params}, images, method="embed_image")[0]

  def embed_text(params, tokens, data_type=None):
    kw = {} if data_type is None else {"data_type": _types(tokens, data_type)}
    return model.apply({"params": params}, tokens, method="embed_text", **kw)[0]

  # Replicated outputs: every process gets the whole result (multi-host evaluation).
  replicated = jax.sharding.PartitionSpec()
  fns = {
      "embed_image": jax.jit(embed_image, out_shardings=replicated),
      "embed_text": jax.jit(embed_text, out_shardings=replicated,
                            static_argnames=("data_type",)),
      "tokenize": lambda texts: tokenizer.tokenize(list(texts), context_length),
      "detokenize": tokenizer.decode,
  }
  if interface.can_generate(model) and tokenizer.bos_id is None:
    fns["generate"] = _needs_bos(tokenizer)
  elif interface.can_generate(model):
    fns["generate"] = generate_fn(model, tokenizer, context_length, replicated)
  if interface.can_embed_tokens(model):
    fns.update(token_predict_fns(model, replicated))
  return fns


def generate_fn(model, tokenizer, context_length: int, out_shardings=None):
  """`generate(params, images, seed=0, max_len=0, method='greedy', beam_size=4,
  length_penalty=0.6, top_p=0.9, temperature=1.0, where='decode.')` -> int32
  [B, max_len] tokens (`models/generate.py`; defaults and ranges:
  `decode_options.py`; max_len 0 = `context_length`), jitted per option set (options
  a method does not read are not part of its key). Bad options raise
  errors.ConfigError naming `where` + KEY."""
  eos_id = -1 if tokenizer.eos_id is None else tokenizer.eos_id  # -1: never ends early.
  static = ("max_len", "method", "beam_size", "length_penalty", "top_p", "temperature")
  kw = {} if out_shardings is None else {"out_shardings": out_shardings}
  jitted = jax.jit(functools.partial(
      generate.generate, model, bos_id=tokenizer.bos_id, eos_id=eos_id,
      pad_id=tokenizer.pad_id), static_argnames=static, **kw)
  d = decode_options.DEFAULTS

  def fn(params, images, seed=d["seed"], max_len=d["max_len"], method=d["method"],
         beam_size=d["beam_size"], length_penalty=d["length_penalty"],
         top_p=d["top_p"], temperature=d["temperature"], where="decode."):
    decode_options.check(method, beam_size, length_penalty, top_p, temperature,
                         max_len, seed, context_length, where)
    opts = dict(generate.DEFAULTS, method=method)
    if method == "beam":
      opts.update(beam_size=beam_size, length_penalty=float(length_penalty))
    elif method == "sample":
      opts.update(top_p=float(top_p), temperature=float(temperature))
    return jitted(params, images, seed=jnp.int32(seed), max_len=max_len or context_length,
                  **opts)
  return fn


def _needs_bos(tokenizer):
  """A 'generate' that explains why a tokenizer without BOS cannot start a caption."""
  def generate_fn(*unused_args, **unused_kwargs):
    raise errors.ConfigError(
        f"Caption generation starts from a BOS token, but {tokenizer!r} has none "
        "(T5/SigLIP-style 'siglip:' or 'hf:' tokenizers). Use a tokenizer with BOS "
        "(e.g. --config.data.tokenizer=clip) for the captioning evaluator.")
  return generate_fn


def _types(tokens, data_type):
  """[B] int32 of `data_type` (None: the model's default, the caption prefix)."""
  if data_type is None:
    return None
  return jnp.full((tokens.shape[0],), data_type, jnp.int32)


def token_predict_fns(model, out_shardings=None):
  """The FILIP predict fns, jitted:

  - `embed_image_tokens(params, images)` -> image token embeddings [B, N, d];
  - `embed_text_tokens(params, tokens, data_type=None)` -> (text token embeddings
    [B, T, d], mask [B, T] float32);
  - `token_scores(image_tokens, text_tokens, text_mask, length)` -> (s^I, s^T)
    [Bi, Bt] float32 over the first `length` (static) text positions
    (`objectives.filip.token_similarities`: s^I ranks texts for an image, s^T
    images for a text).
  """
  def embed_image_tokens(params, images):
    return model.apply({"params": params}, images, method="embed_image_tokens")[1]

  def embed_text_tokens(params, tokens, data_type=None):
    _, emb, mask = model.apply({"params": params}, tokens,
                               data_type=_types(tokens, data_type),
                               method="embed_text_tokens")
    return emb, mask

  def token_scores(image_tokens, text_tokens, text_mask, length):
    return filip.token_similarities(image_tokens, text_tokens[:, :length],
                                    text_mask[:, :length])

  kw = {} if out_shardings is None else {"out_shardings": out_shardings}
  return {
      "embed_image_tokens": jax.jit(embed_image_tokens, **kw),
      "embed_text_tokens": jax.jit(embed_text_tokens, static_argnames=("data_type",),
                                   **kw),
      "token_scores": jax.jit(token_scores, static_argnames=("length",), **kw),
  }
