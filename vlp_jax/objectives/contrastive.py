"""Contrastive image-text objectives: CLIP (softmax InfoNCE) and SigLIP (sigmoid).

The core math lives in small array-level helpers (`clip_logits`,
`clip_loss_from_embeddings`, `siglip_loss_from_embeddings`) so that sharded or
chunked variants can reuse them; the registered objectives only unpack inputs.
"""
import jax
import jax.numpy as jnp

from vlp_jax.registry import OBJECTIVES


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def clip_logits(image_emb, text_emb, scale):
  """Returns the [B_img, B_txt] float32 similarity logits `scale * img @ txt.T`."""
  return _f32(scale) * (_f32(image_emb) @ _f32(text_emb).T)


def _smoothed_ce(logits, label_smoothing):
  """Per-row CE of `logits` [N,C] against smoothed one-hot targets on arange(N)."""
  n, c = logits.shape
  targets = jax.nn.one_hot(jnp.arange(n), c, dtype=jnp.float32)
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / c
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def clip_loss_from_embeddings(image_emb, text_emb, scale, label_smoothing=0.0):
  """Symmetric InfoNCE loss; matching pairs are on the diagonal.

  Args:
    image_emb: [B, D] L2-normalised image embeddings.
    text_emb: [B, D] L2-normalised text embeddings.
    scale: scalar multiplicative temperature.
    label_smoothing: smoothing mass spread uniformly over the B candidates.

  Returns:
    (loss, logits): the float32 scalar loss and the [B, B] logits.
  """
  logits = clip_logits(image_emb, text_emb, scale)
  i2t = jnp.mean(_smoothed_ce(logits, label_smoothing))
  t2i = jnp.mean(_smoothed_ce(logits.T, label_smoothing))
  return 0.5 * (i2t + t2i), logits


def siglip_loss_from_embeddings(image_emb, text_emb, scale, bias):
  """Pairwise sigmoid loss `-(1/B) sum_ij log_sigmoid(z_ij (t <x_i, y_j> + b))`.

  Args:
    image_emb: [B, D] L2-normalised image embeddings.
    text_emb: [B, D] L2-normalised text embeddings.
    scale: scalar multiplicative temperature t.
    bias: scalar logit bias b.

  Returns:
    (loss, logits): the float32 scalar loss and the [B, B] biased logits.
  """
  logits = clip_logits(image_emb, text_emb, scale) + _f32(bias)
  n = logits.shape[0]
  signs = 2.0 * jnp.eye(n, logits.shape[1], dtype=jnp.float32) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
  return loss, logits


@OBJECTIVES.register("clip")
def clip(outputs, batch, cfg):
  """CLIP objective. Options: `label_smoothing` (0.0)."""
  del batch
  ls = float((cfg or {}).get("label_smoothing", 0.0))
  scale = outputs["logit_scale"]
  loss, logits = clip_loss_from_embeddings(
      outputs["image_emb"], outputs["text_emb"], scale, label_smoothing=ls)
  labels = jnp.arange(logits.shape[0])
  metrics = {
      "loss": loss,
      "i2t_acc": jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)),
      "t2i_acc": jnp.mean((jnp.argmax(logits, axis=0) == labels).astype(jnp.float32)),
      "logit_scale": _f32(scale),
  }
  return loss, metrics


@OBJECTIVES.register("siglip")
def siglip(outputs, batch, cfg):
  """SigLIP objective. No options."""
  del batch, cfg
  scale, bias = outputs["logit_scale"], outputs["logit_bias"]
  loss, _ = siglip_loss_from_embeddings(
      outputs["image_emb"], outputs["text_emb"], scale, bias)
  metrics = {"loss": loss, "logit_scale": _f32(scale), "logit_bias": _f32(bias)}
  return loss, metrics
