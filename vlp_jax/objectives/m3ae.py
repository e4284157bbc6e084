"""M3AE's masked-modelling losses (Geng et al., 2022), as the authors' JAX code
(`m3ae/model.py`: `patch_mse_loss`, `cross_entropy_loss_and_accuracy`).

Two objectives, so `config.objectives` weights them (the authors' README command:
{'m3ae_image': 1.0, 'm3ae_text': 0.5}; their flag default for the text weight is
0.1):

- `m3ae_image`: per patch, the mean squared error over its p*p*3 values between the
  predicted and target pixels; per example, the mean over its masked patches; then
  the mean over the batch. The target is the model's `m3ae_pixel_target` (the
  pipeline's dataset-normalised image, patchified), as the authors' code; option
  `norm_pix_loss` (False) first normalises each target patch by its own mean and
  variance (MAE's `norm_pix_loss`, (t - mean) / sqrt(var + 1e-6)).
- `m3ae_text`: per example, the summed cross-entropy over its masked non-padding
  tokens (`m3ae_text_mask`) divided by their count (an example with none adds 0);
  then the mean over the batch. Metric `token_acc`: the same average of correct
  argmax predictions.

Both are per-example means, so gradient accumulation over equal micro-batches gives
the full-batch value.
"""
import jax
import jax.numpy as jnp

from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

IMAGE_OPTIONS = {"norm_pix_loss": False}


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def normalize_patches(target, eps=1e-6):
  """Each patch [..., P] standardised by its own mean and (biased) variance."""
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True)
  return (target - mean) / jnp.sqrt(var + eps)


def image_loss(pred, target, mask, norm_pix_loss=False):
  """Mean over the batch of each example's mean over its masked patches (`mask`
  [B, N], 1 = masked) of the per-patch MSE of `pred` / `target` [B, N, P]."""
  target = _f32(target)
  if norm_pix_loss:
    target = normalize_patches(target)
  mask = _f32(mask)
  per_patch = jnp.mean(jnp.square(_f32(pred) - target), axis=-1)
  per_example = jnp.sum(per_patch * mask, axis=-1) / jnp.maximum(
      jnp.sum(mask, axis=-1), 1.0)
  return jnp.mean(per_example)


def text_loss(logits, tokens, mask):
  """(loss, token_acc): the mean over the batch of each example's mean cross-entropy
  (and argmax accuracy) over its target positions (`mask` [B, L], 1 = target)."""
  logits, mask = _f32(logits), _f32(mask)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_lp = jnp.take_along_axis(log_probs, jnp.asarray(tokens)[..., None],
                                 axis=-1)[..., 0]
  count = jnp.maximum(jnp.sum(mask, axis=-1), 1e-5)
  loss = -jnp.mean(jnp.sum(token_lp * mask, axis=-1) / count)
  correct = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)
  return loss, jnp.mean(jnp.sum(correct * mask, axis=-1) / count)


def check_image_options(cfg):
  """`m3ae_image`'s options with defaults filled in (ValueError naming the fix)."""
  cfg = contrastive.check_options(cfg, "m3ae_image", IMAGE_OPTIONS)
  if not isinstance(cfg["norm_pix_loss"], bool):
    raise ValueError("config.objective_cfg.m3ae_image.norm_pix_loss must be True or "
                     f"False, got {cfg['norm_pix_loss']!r}.")
  return cfg


def check_text_options(cfg):
  """`m3ae_text` takes no options."""
  return contrastive.check_options(cfg, "m3ae_text", {})


@OBJECTIVES.register("m3ae_image", reads=("m3ae_pixel_pred", "m3ae_pixel_target",
                                          "m3ae_image_mask"),
                     check=check_image_options)
def m3ae_image(outputs, batch, cfg):
  """M3AE's masked-patch pixel MSE. Option: `norm_pix_loss` (False)."""
  del batch
  cfg = check_image_options(cfg)
  loss = image_loss(outputs["m3ae_pixel_pred"], outputs["m3ae_pixel_target"],
                    outputs["m3ae_image_mask"], cfg["norm_pix_loss"])
  return loss, {"loss": loss}


@OBJECTIVES.register("m3ae_text", reads=("m3ae_text_logits", "m3ae_text_mask"),
                     batch_keys=("text",), check=check_text_options)
def m3ae_text(outputs, batch, cfg):
  """M3AE's masked-token cross-entropy (padding never a target)."""
  check_text_options(cfg)
  loss, acc = text_loss(outputs["m3ae_text_logits"], batch["text"],
                        outputs["m3ae_text_mask"])
  return loss, {"loss": loss, "token_acc": acc}
