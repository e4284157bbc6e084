"""Caption decoding for models with `encode_image` and `decode(tokens, context)`
(`interface.Captioner`: CoCa): the decoding methods by name (`generate`, KV-cached:
`kv_decode.py`, `beam_search.py`) and the uncached greedy reference decode.

Methods and their options: `vlp_jax/decode_options.py` ('greedy'; 'beam' with
`beam_size` and GNMT's `length_penalty`; 'sample': nucleus sampling with `top_p`,
`temperature` and a PRNG `seed`). Every method returns int32 [B, max_len]: BOS, the
caption, its end token, then padding.
"""
import jax
import jax.numpy as jnp

from vlp_jax import decode_options, errors
from vlp_jax.models import kv_decode

METHODS = decode_options.METHODS
DEFAULTS = {k: v for k, v in decode_options.DEFAULTS.items()
            if k not in ("max_len", "seed")}
check_options = decode_options.check


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
