"""Contrastive image-text objectives: CLIP (softmax InfoNCE) and SigLIP (sigmoid).

The core math lives in small array-level helpers (`clip_logits`,
`clip_loss_from_embeddings`, `siglip_loss_from_embeddings`) so that sharded or
chunked variants can reuse them; the registered objectives only unpack inputs.

Soft targets of `clip` (row i over the N = B candidates, positive i):

    label_smoothing ls:         t_ii = 1 - ls + ls / N,  t_ij = ls / N
    negative_smoothing alpha:   t_ii = 1 - alpha,        t_ij = alpha / (N - 1)

The second (PyramidCLIP-style "softened negatives", Gao et al. 2022) moves mass
only onto the negatives; the two are exclusive. `soft_targets.py` (lightclip)
ramps alpha over training.

Under a mesh that splits the batch, `clip` and `siglip` use the distributed forms in
`sharded.py` (same value and gradient, no [B, B] logits on any device); the
option `distributed: 'dense'` forces the dense form.
"""
import difflib

import jax
import jax.numpy as jnp

from vlp_jax.objectives import sharded
from vlp_jax.registry import OBJECTIVES

_DISTRIBUTED_MODES = ("auto", "dense")


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def clip_logits(image_emb, text_emb, scale):
  """Returns the [B_img, B_txt] float32 similarity logits `scale * img @ txt.T`."""
  return _f32(scale) * (_f32(image_emb) @ _f32(text_emb).T)


def smoothed_ce(logits, label_smoothing, negative_smoothing=0.0):
  """Per-row CE of `logits` [N,C] against smoothed one-hot targets on arange(N)
  (`sharded.target_coefficients`)."""
  n, c = logits.shape
  targets = jax.nn.one_hot(jnp.arange(n), c, dtype=jnp.float32)
  if not (sharded.is_static_zero(label_smoothing) and
          sharded.is_static_zero(negative_smoothing)):
    on_label, uniform = sharded.target_coefficients(c, label_smoothing,
                                                    negative_smoothing)
    targets = on_label * targets + uniform
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def clip_loss_from_embeddings(image_emb, text_emb, scale, label_smoothing=0.0,
                              negative_smoothing=0.0):
  """Symmetric InfoNCE loss; matching pairs are on the diagonal.

  Args:
    image_emb: [B, D] L2-normalised image embeddings.
    text_emb: [B, D] L2-normalised text embeddings.
    scale: scalar multiplicative temperature.
    label_smoothing: smoothing mass spread uniformly over the B candidates.
    negative_smoothing: smoothing mass spread over the B - 1 negatives only (may be
      a traced scalar).

  Returns:
    (loss, logits): the float32 scalar loss and the [B, B] logits.
  """
  logits = clip_logits(image_emb, text_emb, scale)
  i2t = jnp.mean(smoothed_ce(logits, label_smoothing, negative_smoothing))
  t2i = jnp.mean(smoothed_ce(logits.T, label_smoothing, negative_smoothing))
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


def check_options(cfg, objective, defaults):
  """`cfg` with `defaults` filled in; an unknown key is a ValueError naming the
  closest valid one."""
  cfg = dict(cfg or {})
  for key in cfg:
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" Did you mean '{close[0]}'?" if close else ""
      raise ValueError(
          f"Unknown option '{key}' of objective '{objective}' "
          f"(config.objective_cfg.{objective}).{hint} Its options: "
          f"{sorted(defaults)}.")
  return dict(defaults, **cfg)


def check_fraction(value, name, objective):
  """A float in [0, 1), else a ValueError naming the option."""
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"config.objective_cfg.{objective}.{name}={value} must be in "
                     f"[0, 1).")
  return value


def smoothing_options(cfg, objective):
  """(label_smoothing, negative_smoothing) of `cfg`, checked: each in [0, 1), not
  both non-zero."""
  ls = check_fraction(cfg.get("label_smoothing", 0.0), "label_smoothing", objective)
  ns = check_fraction(cfg.get("negative_smoothing", 0.0), "negative_smoothing",
                      objective)
  if ls and ns:
    raise ValueError(
        f"config.objective_cfg.{objective} sets both label_smoothing={ls} (mass over "
        f"every candidate) and negative_smoothing={ns} (mass over the negatives "
        f"only); set one of them to 0.")
  return ls, ns


def batch_axes(cfg, batch_size):
  """Mesh axes for the distributed form, or () for the dense one (option `distributed`)."""
  mode = (cfg or {}).get("distributed", "auto")
  if mode not in _DISTRIBUTED_MODES:
    raise ValueError(f"Objective option distributed={mode!r}; use one of "
                     f"{_DISTRIBUTED_MODES}.")
  if mode == "dense":
    return ()
  axes = sharded.batch_mesh_axes()
  return axes if sharded.can_shard_batch(batch_size, axes) else ()


CLIP_OPTIONS = {"label_smoothing": 0.0, "negative_smoothing": 0.0,
                "distributed": "auto"}


def clip_with_targets(outputs, cfg, label_smoothing=0.0, negative_smoothing=0.0):
  """(loss, metrics) of CLIP with the given (possibly traced) smoothing, dense or
  sharded per `cfg['distributed']`."""
  ls, ns = label_smoothing, negative_smoothing
  scale = outputs["logit_scale"]
  img, txt = outputs["image_emb"], outputs["text_emb"]
  axes = batch_axes(cfg, img.shape[0])
  if axes:
    loss, i2t_acc, t2i_acc = sharded.clip_loss_local(
        img, txt, scale, label_smoothing=ls, axes=axes, negative_smoothing=ns)
  else:
    loss, logits = clip_loss_from_embeddings(img, txt, scale, label_smoothing=ls,
                                             negative_smoothing=ns)
    labels = jnp.arange(logits.shape[0])
    i2t_acc = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
    t2i_acc = jnp.mean((jnp.argmax(logits, axis=0) == labels).astype(jnp.float32))
  metrics = {
      "loss": loss,
      "i2t_acc": i2t_acc,
      "t2i_acc": t2i_acc,
      "logit_scale": _f32(scale),
  }
  return loss, metrics


def check_clip_options(cfg):
  """CLIP's options with defaults filled in, checked (ValueError naming the fix)."""
  cfg = check_options(cfg, "clip", CLIP_OPTIONS)
  smoothing_options(cfg, "clip")
  return cfg


@OBJECTIVES.register("clip", reads=("image_emb", "text_emb", "logit_scale"),
                     batch_global=True, check=check_clip_options)
def clip(outputs, batch, cfg):
  """CLIP objective. Options: `label_smoothing` (0.0), `negative_smoothing` (0.0;
  exclusive with label_smoothing), `distributed` ('auto'|'dense')."""
  del batch
  cfg = check_clip_options(cfg)
  ls, ns = smoothing_options(cfg, "clip")
  return clip_with_targets(outputs, cfg, ls, ns)


@OBJECTIVES.register(
    "siglip", reads=("image_emb", "text_emb", "logit_scale", "logit_bias"),
    batch_global=True)
def siglip(outputs, batch, cfg):
  """SigLIP objective. Options: `distributed` ('auto'|'dense')."""
  del batch
  scale, bias = outputs["logit_scale"], outputs["logit_bias"]
  img, txt = outputs["image_emb"], outputs["text_emb"]
  axes = batch_axes(cfg, img.shape[0])
  if axes:
    loss = sharded.siglip_loss_chunked(img, txt, scale, bias, axes=axes)
  else:
    loss, _ = siglip_loss_from_embeddings(img, txt, scale, bias)
  metrics = {"loss": loss, "logit_scale": _f32(scale), "logit_bias": _f32(bias)}
  return loss, metrics

