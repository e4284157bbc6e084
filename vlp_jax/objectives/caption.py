"""Captioning objective: masked next-token cross entropy (CoCa decoder head)."""
import jax
import jax.numpy as jnp

from vlp_jax.registry import OBJECTIVES


def token_ce(logits, tokens, pad_id=0, label_smoothing=0.0):
  """Per-target next-token cross entropy; `logits[:, t]` predicts `tokens[:, t + 1]`.

  Args:
    logits: [B, L, V] next-token logits.
    tokens: [B, L] int token ids; positions whose target equals `pad_id` are masked.
    pad_id: padding token id.
    label_smoothing: smoothing mass spread uniformly over the V classes.

  Returns:
    (ce, mask, correct): float32 [B, L - 1] each: the cross entropy of each target,
    1 on real (non-pad) targets, 1 where the argmax is the target.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)[:, :-1]
  targets = jnp.asarray(tokens)[:, 1:]
  mask = (targets != pad_id).astype(jnp.float32)
  vocab = logits.shape[-1]
  onehot = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
  if label_smoothing:
    onehot = (1.0 - label_smoothing) * onehot + label_smoothing / vocab
  ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return ce, mask, correct


def caption_loss_from_logits(logits, tokens, pad_id=0, label_smoothing=0.0):
  """Masked next-token CE (`token_ce`, same arguments) averaged over the unmasked
  target tokens -> (loss, token_acc) float32 scalars."""
  ce, mask, correct = token_ce(logits, tokens, pad_id, label_smoothing)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(mask * ce) / denom
  token_acc = jnp.sum(mask * correct) / denom
  return loss, token_acc


@OBJECTIVES.register("caption", reads=("caption_logits",), batch_keys=("text",))
def caption(outputs, batch, cfg):
  """Caption objective. Options: `pad_id` (0), `label_smoothing` (0.0)."""
  cfg = cfg or {}
  loss, token_acc = caption_loss_from_logits(
      outputs["caption_logits"], batch["text"],
      pad_id=int(cfg.get("pad_id", 0)),
      label_smoothing=float(cfg.get("label_smoothing", 0.0)))
  return loss, {"loss": loss, "token_acc": token_acc}
