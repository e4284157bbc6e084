"""Jitted inference functions handed to evaluators (`predict_fns`), from what every
model family provides (`models/interface.py`): `embed_image`, `embed_text`, and for
families that generate, `encode_image` + `decode`."""
import functools

import jax

from vlp_jax.models import generate, interface


def make_predict_fns(model, tokenizer, context_length: int):
  """{'embed_image', 'embed_text', 'generate' (if the model decodes), 'tokenize', 'detokenize'}."""
  def embed_image(params, images):
    return model.apply({"params": params}, images, method="embed_image")[0]

  def embed_text(params, tokens):
    return model.apply({"params": params}, tokens, method="embed_text")[0]

  # Replicated outputs: every process gets the whole result (multi-host evaluation).
  replicated = jax.sharding.PartitionSpec()
  fns = {
      "embed_image": jax.jit(embed_image, out_shardings=replicated),
      "embed_text": jax.jit(embed_text, out_shardings=replicated),
      "tokenize": lambda texts: tokenizer.tokenize(list(texts), context_length),
      "detokenize": tokenizer.decode,
  }
  if interface.can_generate(model):
    fns["generate"] = jax.jit(functools.partial(
        generate.greedy_generate, model, max_len=context_length,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),
                              out_shardings=replicated)
  return fns
