"""A test-only batch-global objective that reads token outputs (FILIP-like).

Importing this module registers it as `contract_filip` (with `replace=True`, so the
test files that share it may each import it).

Token-wise late interaction (FILIP, Yao et al. 2021), without projections: image and
text tokens are cut to their first min(widths) dims and L2-normalised; the i2t
similarity of image i and text j is the mean over image tokens of the max cosine
similarity over text j's non-padding tokens, the t2i one the mean over text j's
non-padding tokens of the max over image i's tokens. The loss is the symmetric
InfoNCE over every pair of the batch at temperature `logit_scale`.
"""
import jax
import jax.numpy as jnp

from vlp_jax.registry import OBJECTIVES

NAME = "contract_filip"
READS = ("image_tokens", "text_tokens", "logit_scale")


def _normalised(x, d):
  x = jnp.asarray(x).astype(jnp.float32)[..., :d]
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _ce_diag(logits):
  """Mean CE of each row against its diagonal entry."""
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def token_similarities(image_tokens, text_tokens, text, pad_id=0):
  """([B_img, B_txt] i2t, [B_img, B_txt] t2i) late-interaction similarities."""
  d = min(image_tokens.shape[-1], text_tokens.shape[-1])
  img, txt = _normalised(image_tokens, d), _normalised(text_tokens, d)
  valid = (jnp.asarray(text) != pad_id).astype(jnp.float32)  # [B_txt, M]
  sim = jnp.einsum("ind,jmd->ijnm", img, txt)  # [B_img, B_txt, N, M]
  # Cosine similarities are >= -1: -2 never wins a max against a real token.
  i2t = jnp.mean(jnp.max(jnp.where(valid[None, :, None, :] > 0, sim, -2.0), axis=3),
                 axis=2)
  t2i = jnp.sum(jnp.max(sim, axis=2) * valid[None], axis=2) / jnp.maximum(
      jnp.sum(valid, axis=1), 1.0)[None]
  return i2t, t2i


@OBJECTIVES.register(NAME, replace=True, reads=READS, batch_keys=("text",),
                     batch_global=True)
def contract_filip(outputs, batch, cfg):
  """Symmetric InfoNCE on token-wise late-interaction similarities."""
  pad_id = int((cfg or {}).get("pad_id", 0))
  i2t, t2i = token_similarities(outputs["image_tokens"], outputs["text_tokens"],
                                batch["text"], pad_id)
  scale = jnp.asarray(outputs["logit_scale"]).astype(jnp.float32)
  loss = 0.5 * (_ce_diag(scale * i2t) + _ce_diag(scale * t2i.T))
  acc = jnp.mean((jnp.argmax(i2t, axis=1) == jnp.arange(i2t.shape[0])).astype(
      jnp.float32))
  return loss, {"loss": loss, "i2t_acc": acc}


def config(base):
  """`base` (tests.test_train.tiny_config()) as a two-tower model trained with this
  objective and CLIP: the accumulation cache holds both token arrays and both
  embeddings."""
  base.model.name = "two_tower"
  base.objectives = {NAME: 1.0, "clip": 0.5}
  return base
