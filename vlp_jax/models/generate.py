"""Greedy caption decoding for models with `encode_image` and `decode(tokens, context)`
(`interface.Captioner`: CoCa)."""
import jax
import jax.numpy as jnp


def greedy_generate(model, params, images, max_len: int, bos_id: int, eos_id: int,
                    pad_id: int = 0):
  """Returns int32 [B, max_len] tokens: BOS, the argmax continuation, then padding.

  The image context is computed once; each step re-runs the decoder over the fixed-size
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
