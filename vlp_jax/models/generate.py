"""Caption decoding for models with `encode_image` and `decode(tokens, context)`
(`interface.Captioner`: CoCa): the decoding methods by name (`generate`, KV-cached:
`kv_decode.py`, `beam_search.py`) and the uncached greedy reference decode.

Methods: 'greedy'; 'beam' (`beam_size`, `length_penalty`: GNMT's
((5 + n) / 6) ** length_penalty divides the log-probability of n generated tokens);
'sample' (nucleus sampling: `top_p`, `temperature`, a PRNG `seed`). Every method
returns int32 [B, max_len]: BOS, the caption, its end token, then padding.
"""
import jax
import jax.numpy as jnp

from vlp_jax import errors
from vlp_jax.models import kv_decode

METHODS = ("greedy", "beam", "sample")
# The decoding options with their defaults (GNMT's and t5x's length penalty 0.6).
DEFAULTS = {"method": "greedy", "beam_size": 4, "length_penalty": 0.6, "top_p": 0.9,
            "temperature": 1.0}


def check_options(method: str, beam_size: int, length_penalty: float, top_p: float,
                  temperature: float, max_len: int, context_length: int,
                  where: str = "decode.") -> None:
  """Raises errors.ConfigError naming the bad option (`where` + its name, e.g.
  'config.evals.captioning.' or '--') and the valid range; `max_len` must be in
  [2, context_length]."""
  def bad(key, value, valid):
    raise errors.ConfigError(f"{where}{key}={value!r} is invalid: it must be {valid}.")
  if method not in METHODS:
    bad("method", method, f"one of {list(METHODS)}")
  if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
    bad("beam_size", beam_size, "an integer >= 1 (hypotheses kept per image)")
  if not 0 <= length_penalty <= 10:
    bad("length_penalty", length_penalty, "in [0, 10] (GNMT's alpha; 0 = log-prob)")
  if not 0 < top_p <= 1:
    bad("top_p", top_p, "in (0, 1] (nucleus mass; 1 = plain sampling)")
  if not temperature > 0:
    bad("temperature", temperature, "> 0 (logits are divided by it)")
  if not isinstance(max_len, int) or not 2 <= max_len <= context_length:
    bad("max_len", max_len, f"an integer in [2, {context_length}] (the model's "
        "text context length: captions are BOS + up to max_len - 1 tokens)")


def generate(model, params, images, max_len: int, bos_id: int, eos_id: int,
             pad_id: int = 0, method: str = "greedy", beam_size: int = 4,
             length_penalty: float = 0.6, top_p: float = 0.9,
             temperature: float = 1.0, seed=0):
  """Decodes captions of `images` with `method` (KV-cached): int32 [B, max_len].
  Everything but `params`, `images` and `seed` (an int, traced) is static."""
  if method == "greedy":
    return kv_decode.greedy(model, params, images, max_len, bos_id, eos_id, pad_id)
  if method == "beam":
    return kv_decode.beam(model, params, images, max_len, bos_id, eos_id, pad_id,
                          beam_size, length_penalty)
  if method == "sample":
    return kv_decode.sample(model, params, images, jax.random.key(seed), max_len,
                            bos_id, eos_id, pad_id, top_p, temperature)
  raise errors.ConfigError(f"Decoding method {method!r} is not one of {list(METHODS)}.")


def greedy_generate(model, params, images, max_len: int, bos_id: int, eos_id: int,
                    pad_id: int = 0):
  """Returns int32 [B, max_len] tokens: BOS, the argmax continuation, then padding.

  Without a cache (the reference the cached decodes are tested against): the image
  context is computed once; each step re-runs the decoder over the fixed-size
  buffer (causal attention makes later, still-empty positions irrelevant).
  """
  variables = {"params": params}
  _, _, context = model.apply(variables, images, method="encode_image")
  b = images.shape[0]
  tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)

  def body(t, carry):
    tokens, done = carry
    logits = model.apply(variables, tokens, context, method="decode")
    nxt = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = tokens.at[:, t + 1].set(nxt)
    return tokens, done | (nxt == eos_id) | (nxt == pad_id)

  tokens, _ = jax.lax.fori_loop(0, max_len - 1, body, (tokens, jnp.zeros((b,), bool)))
  return tokens
