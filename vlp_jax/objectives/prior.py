"""PRIOR: prioritised captioning (Chen, Peng, Zhang, Ji, arXiv 2505.08971), and the
text-only language-model loss its reference model is trained with.

'text_lm': the reference model's loss, plain next-token cross entropy on
'text_lm_logits' (CoCa's decoder with cross-attention skipped: the captions without
the image), averaged over the batch's real target tokens like 'caption'.

'prior' / 'prior_data': captioning whose per-token loss weights come from the frozen
reference model. For caption b with real (non-pad) targets t_1..t_k (t_i = text[b, i],
predicted from text[b, <i]; the first token, BOS, is never a target):

    p_i = P_ref(t_i | t_<i),   w_i = max((1 - p_i)^alpha, min_weight)
    v_i = k w_i / sum_j w_j                   (normalize='caption': mean 1 per caption)
    v_i = N w_i / sum_{b', j} w_{b' j}         (normalize='batch': mean 1 over the batch)
    L   = (1 / N) sum_b sum_i v_i (-log P_theta(t_i | image, t_<i))

where N is the batch's number of real targets: the caption loss's average over tokens
with each token's cross entropy scaled by v_i, i.e. the N-token-weighted mean of the
paper's per-caption sums -sum_i [k w_i / sum_j w_j] log P_theta. With all weights
equal (alpha = 0, or a reference that predicts every token alike) v_i = 1 and L is
exactly 'caption''s loss. A caption whose weights are all 0 (every p_i = 1) gets v_i
= 1 (uniform). The weights are constants (stop_gradient): the reference is frozen.

'prior' reads p from 'teacher_text_lm_logits' (the momentum teacher held frozen:
config.teacher.momentum=1.0, initialised from the reference run with
config.teacher.init_from; configs/prior_coca_b16.py); 'prior_data' reads it from the
batch field 'ref_probs' [B, L] float32, ref_probs[b, i] = P_ref(text[b, i] |
text[b, <i]) (tools/prior_probs.py writes the table, config.data.ref_probs attaches
it; vlp_jax/data/ref_probs.py). Both give the same loss on the same batch.

Options (both): `alpha` (1.0), `normalize` ('caption' | 'batch'), `min_weight` (0.0,
a floor on w_i), `pad_id` (0), `label_smoothing` (0.0, as 'caption'). The end-of-text
token is a target like any other (the caption loss's choice).
"""
import math

import jax
import jax.numpy as jnp

from vlp_jax.objectives import caption as caption_lib
from vlp_jax.registry import OBJECTIVES

PRIOR_OPTIONS = {"alpha": 1.0, "normalize": "caption", "min_weight": 0.0, "pad_id": 0,
                 "label_smoothing": 0.0}
NORMALIZE = ("caption", "batch")


def check_options(cfg, objective="prior"):
  """`cfg` with defaults filled in, checked (ValueError naming the option and fix)."""
  cfg = dict(cfg or {})
  unknown = sorted(set(cfg) - set(PRIOR_OPTIONS))
  if unknown:
    raise ValueError(f"config.objective_cfg.{objective} has unknown options {unknown}; "
                     f"it takes {sorted(PRIOR_OPTIONS)}.")
  cfg = dict(PRIOR_OPTIONS, **cfg)
  for key in ("alpha", "min_weight", "label_smoothing"):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
        or v < 0:
      raise ValueError(f"config.objective_cfg.{objective}.{key}={v!r} must be a finite "
                       "number >= 0 (alpha: PRIOR uses 1.0).")
  if cfg["min_weight"] > 1 or cfg["label_smoothing"] >= 1:
    raise ValueError(f"config.objective_cfg.{objective}: min_weight must be <= 1 and "
                     "label_smoothing < 1.")
  if cfg["normalize"] not in NORMALIZE:
    raise ValueError(f"config.objective_cfg.{objective}.normalize={cfg['normalize']!r} "
                     f"is not one of {list(NORMALIZE)} ('caption': the weights average "
                     "to 1 within each caption, as the paper).")
  if isinstance(cfg["pad_id"], bool) or not isinstance(cfg["pad_id"], int):
    raise ValueError(f"config.objective_cfg.{objective}.pad_id must be an integer.")
  return cfg


def check_data(config, objective: str) -> None:
  """ConfigError when `objective` reads batch 'ref_probs' but config.data.ref_probs
  (the table that adds it) is unset: caught at start-up, not at the first batch."""
  from vlp_jax import errors  # pylint: disable=g-import-not-at-top
  from vlp_jax.registry import OBJECTIVES  # pylint: disable=g-import-not-at-top
  if "ref_probs" in OBJECTIVES.info(objective)["batch_keys"] and not config.data.get(
      "ref_probs"):
    raise errors.ConfigError(
        f"Objective '{objective}' reads the batch field 'ref_probs', but "
        "config.data.ref_probs is unset: write the table with tools/prior_probs.py and "
        "pass --config.data.ref_probs=TABLE (or configs/prior_coca_b16.py:"
        "precomputed=TABLE).")


def target_probs(lm_logits, tokens):
  """P_ref(text[:, i] | text[:, <i]) for i = 1..L-1 from next-token logits [B, L, V]
  (`lm_logits[:, t]` predicts `tokens[:, t + 1]`) -> float32 [B, L - 1]."""
  logp = jax.nn.log_softmax(jnp.asarray(lm_logits, jnp.float32)[:, :-1], axis=-1)
  targets = jnp.asarray(tokens)[:, 1:]
  return jnp.exp(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0])


def token_weights(ref_probs, mask, alpha=1.0, normalize="caption", min_weight=0.0):
  """The loss weights v [B, T] of the targets (`ref_probs`, `mask`: [B, T], mask 1 on
  real targets): w = max((1 - p)^alpha, min_weight), renormalised to mean 1 over each
  caption's (or the batch's) real targets; 0 on masked positions. No gradient."""
  p = jax.lax.stop_gradient(jnp.asarray(ref_probs, jnp.float32))
  mask = jnp.asarray(mask, jnp.float32)
  w = jnp.maximum(jnp.power(jnp.clip(1.0 - p, 0.0, 1.0), alpha), min_weight) * mask
  axis = 1 if normalize == "caption" else None
  total = jnp.sum(w, axis=axis, keepdims=True)
  count = jnp.sum(mask, axis=axis, keepdims=True)
  v = jnp.where(total > 0, count * w / jnp.where(total > 0, total, 1.0), mask)
  return v * mask


def prior_loss(logits, tokens, ref_probs, alpha=1.0, normalize="caption",
               min_weight=0.0, pad_id=0, label_smoothing=0.0):
  """PRIOR's weighted next-token loss (module docstring).

  Args:
    logits: [B, L, V] caption logits; `logits[:, t]` predicts `tokens[:, t + 1]`.
    tokens: [B, L] int token ids; targets equal to `pad_id` are masked.
    ref_probs: [B, L - 1] P_ref of each target `tokens[:, 1:]` (`target_probs`).

  Returns:
    (loss, metrics): float32 scalar; {'token_acc', 'ref_prob' (mean P_ref of the
    real targets), 'caption_ce' (the unweighted caption loss), 'max_weight'}.
  """
  ce, mask, correct = caption_lib.token_ce(logits, tokens, pad_id, label_smoothing)
  v = token_weights(ref_probs, mask, alpha, normalize, min_weight)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(v * ce) / denom
  p = jax.lax.stop_gradient(jnp.asarray(ref_probs, jnp.float32))
  return loss, {"token_acc": jnp.sum(mask * correct) / denom,
                "ref_prob": jnp.sum(mask * p) / denom,
                "caption_ce": jax.lax.stop_gradient(jnp.sum(mask * ce) / denom),
                "max_weight": jnp.max(v)}


def _prior(logits, tokens, ref_probs, cfg, objective):
  cfg = check_options(cfg, objective)
  loss, metrics = prior_loss(logits, tokens, ref_probs, float(cfg["alpha"]),
                             cfg["normalize"], float(cfg["min_weight"]),
                             int(cfg["pad_id"]), float(cfg["label_smoothing"]))
  return loss, dict(loss=loss, **metrics)


@OBJECTIVES.register("prior", reads=("caption_logits", "teacher_text_lm_logits"),
                     batch_keys=("text",), check=lambda cfg: check_options(cfg, "prior"))
def prior(outputs, batch, cfg):
  """PRIOR with the frozen reference's probabilities computed in the step (the
  teacher's 'text_lm_logits'). Options: alpha, normalize, min_weight, pad_id,
  label_smoothing."""
  probs = target_probs(outputs["teacher_text_lm_logits"], batch["text"])
  return _prior(outputs["caption_logits"], batch["text"], probs, cfg, "prior")


@OBJECTIVES.register("prior_data", reads=("caption_logits",),
                     batch_keys=("text", "ref_probs"),
                     check=lambda cfg: check_options(cfg, "prior_data"))
def prior_data(outputs, batch, cfg):
  """PRIOR with precomputed reference probabilities (batch 'ref_probs' [B, L]:
  config.data.ref_probs, tools/prior_probs.py). Options as 'prior'."""
  probs = jnp.asarray(batch["ref_probs"], jnp.float32)[:, 1:]
  return _prior(outputs["caption_logits"], batch["text"], probs, cfg, "prior_data")


@OBJECTIVES.register("text_lm", reads=("text_lm_logits",), batch_keys=("text",))
def text_lm(outputs, batch, cfg):
  """Next-token loss of the text-only decoder (PRIOR's reference model). Options:
  `pad_id` (0), `label_smoothing` (0.0)."""
  cfg = cfg or {}
  loss, token_acc = caption_lib.caption_loss_from_logits(
      outputs["text_lm_logits"], batch["text"], pad_id=int(cfg.get("pad_id", 0)),
      label_smoothing=float(cfg.get("label_smoothing", 0.0)))
  return loss, {"loss": loss, "token_acc": token_acc}
