"""SigLIP 2's self-supervised terms (Tschannen et al., 2025, from SILC and TIPS),
switched on for the last part of training.

Both compare the student with the momentum (EMA) teacher (`vlp_jax/train/teacher.py`)
by cosine similarity; with u^ = u / max(||u||, eps):

  'self_distill' (SILC's local-to-global consistency): the student's embeddings of
  the M local crops s_bm = 'view_emb/local' [B, M, D] match the teacher's embedding of
  the full image t_b = 'teacher_image_emb' [B, D]:

      L_sd = (1 / (B M)) sum_b sum_m (1 - <s^_bm, t^_b>)

  'masked_prediction' (TIPS's masked image modelling): the student's tokens of the
  image with a fraction of its patches replaced by the mask token,
  s_bn = 'masked_image_tokens' [B, N, W], match the teacher's tokens of the unmasked
  image t_bn = 'teacher_image_tokens' at the masked positions M_b
  ('image_patch_mask' [B, N], 1 = masked):

      L_mp = (1 / B) sum_b (1 / |M_b|) sum_{n in M_b} (1 - <s^_bn, t^_bn>)

Schedule: each loss is multiplied by a_k = [k >= floor(start_fraction total_steps)]
at step k (`batch['step']`): 0 before, the loss after (the paper: "during the last 20%
of training", start_fraction 0.8). The extra forward passes (local crops, masked
image, teacher) still run before the start; only the loss and its gradient are zero.

Deviation (stated in the README): SILC and TIPS put DINO / iBOT heads (an MLP and
prototypes, a centred and sharpened teacher softmax, a cross-entropy) on both
networks. Here the features are matched directly by cosine distance (the normalised-L2
form BYOL uses): no heads, no centre state. Options of both: `start_fraction` (0.8),
`total_steps` (required: the recipe sets config.total_steps).
"""
import math

import jax.numpy as jnp

from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

SIGLIP2_OPTIONS = {"start_fraction": 0.8, "total_steps": None}
EPS = 1e-6


def check_options(cfg, objective):
  """`cfg` with defaults filled in, checked (ValueError naming the option and fix)."""
  cfg = contrastive.check_options(cfg, objective, SIGLIP2_OPTIONS)
  frac = cfg["start_fraction"]
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (
      math.isfinite(frac) and 0.0 <= frac <= 1.0):
    raise ValueError(f"config.objective_cfg.{objective}.start_fraction={frac!r} must "
                     "be a number in [0, 1] (the fraction of training before the loss "
                     "starts; SigLIP 2: 0.8).")
  steps = cfg["total_steps"]
  if steps is None:
    raise ValueError(f"Objective '{objective}' needs config.objective_cfg.{objective}."
                     "total_steps (set it to config.total_steps; the recipe "
                     "configs/siglip2_b16.py does).")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"config.objective_cfg.{objective}.total_steps={steps!r} must be "
                     "a positive integer (config.total_steps).")
  return cfg


def start_step(cfg) -> int:
  """The first step at which the loss is on: floor(start_fraction total_steps)."""
  return int(math.floor(float(cfg["start_fraction"]) * int(cfg["total_steps"])))


def active(step, cfg):
  """float32 1.0 from `start_step(cfg)` on, 0.0 before (`step` may be traced)."""
  return (jnp.asarray(step, jnp.int32) >= start_step(cfg)).astype(jnp.float32)


def _unit(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)


def self_distill_loss(local_emb, teacher_emb):
  """(L_sd, mean cosine) for local embeddings [B, M, D] and teacher embeddings [B, D]."""
  cos = jnp.sum(_unit(local_emb) * _unit(teacher_emb)[:, None, :], axis=-1)
  return jnp.mean(1.0 - cos), jnp.mean(cos)


def masked_prediction_loss(student_tokens, teacher_tokens, patch_mask):
  """(L_mp, mean cosine at masked positions) for tokens [B, N, W] and a mask [B, N]
  (1 = masked)."""
  if student_tokens.shape != teacher_tokens.shape:
    raise ValueError(f"masked_prediction: student tokens {student_tokens.shape} and "
                     f"teacher tokens {teacher_tokens.shape} differ in shape.")
  mask = jnp.asarray(patch_mask, jnp.float32)
  cos = jnp.sum(_unit(student_tokens) * _unit(teacher_tokens), axis=-1)
  count = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  per_example = jnp.sum(mask * (1.0 - cos), axis=1) / count
  return jnp.mean(per_example), jnp.mean(jnp.sum(mask * cos, axis=1) / count)


@OBJECTIVES.register("self_distill", reads=("view_emb/local", "teacher_image_emb"),
                     batch_keys=("step",),
                     check=lambda cfg: check_options(cfg, "self_distill"),
                     starts_at=lambda cfg: start_step(check_options(cfg, "self_distill")))
def self_distill(outputs, batch, cfg):
  """Local-crop student vs the EMA teacher's full image, from `start_fraction` of
  training on. Options: `start_fraction` (0.8), `total_steps` (required)."""
  cfg = check_options(cfg, "self_distill")
  loss, cos = self_distill_loss(outputs["view_emb/local"], outputs["teacher_image_emb"])
  on = active(batch["step"], cfg)
  return on * loss, {"loss": on * loss, "active": on, "cosine": cos}


@OBJECTIVES.register("masked_prediction",
                     reads=("masked_image_tokens", "image_patch_mask",
                            "teacher_image_tokens"),
                     batch_keys=("step",),
                     check=lambda cfg: check_options(cfg, "masked_prediction"),
                     starts_at=lambda cfg: start_step(
                         check_options(cfg, "masked_prediction")))
def masked_prediction(outputs, batch, cfg):
  """Masked-image student tokens vs the EMA teacher's tokens at the masked patches,
  from `start_fraction` of training on. Options: `start_fraction` (0.8),
  `total_steps` (required)."""
  cfg = check_options(cfg, "masked_prediction")
  loss, cos = masked_prediction_loss(outputs["masked_image_tokens"],
                                     outputs["teacher_image_tokens"],
                                     outputs["image_patch_mask"])
  on = active(batch["step"], cfg)
  return on * loss, {"loss": on * loss, "active": on, "cosine": cos}
