"""PyramidCLIP (Gao et al., NeurIPS 2022, arXiv 2204.14095) on a two-level pyramid.

The paper builds a semantic pyramid per modality and aligns it "via peer-level
semantics alignment and cross-level relation alignment", softening "the loss of
negative samples (unpaired samples)" (abstract). Here the pyramid has the two levels
the data pipeline provides (no object detector, so no ROI level):

    image  global = outputs 'image_emb'  (batch['image'], crop scale 0.9-1.0 in
                                           configs/pyramidclip_b16.py)
           local  = 'view_emb/local'      [B, K, D] (config.data.views.local)
    text   short  = 'text_view_emb/short' (config.data.text_views.short: a
                                           summariser stand-in, e.g. the caption's
                                           first sentence)
           full   = 'text_emb'            (the original caption)

Levels: (global, short) are the coarse level, (local, full) the fine one. Each term
is a symmetric InfoNCE between an image level V and a text level T with softened
negatives (row i over the N = global-batch candidates, positive i):

    q_ii = 1 - alpha,   q_ij = alpha / (N - 1)   (j != i)
    L(V, T) = 1/2 [ -1/N sum_i sum_j q_ij log softmax_j(s v_i . t_j)
                    -1/N sum_j sum_i q_ji log softmax_i(s v_i . t_j) ]

    peer  = L(global, short) + L(local, full)
    cross = L(global, full)  + L(local, short)
    loss  = peer_weight * peer + cross_weight * cross

with one learned scale s (`logit_scale`). With K > 1 local crops, each local term is
the mean over the K crops. Every term is `contrastive.clip_with_targets` (dense, or
the exact batch-sharded form of `sharded.py` under a mesh that splits the batch).

Not confirmed against the paper's method section (only its abstract and a secondary
summary could be read; see README "PyramidCLIP"): which pairs form the peer and
cross terms, the spread of the softened mass over the negatives, alpha = 0.2 and the
equal weights. Options: `negative_smoothing` alpha (0.2), `peer_weight` (1.0),
`cross_weight` (1.0), `distributed` ('auto'|'dense').
"""
import jax.numpy as jnp

from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

LOCAL, SHORT = "view_emb/local", "text_view_emb/short"
PYRAMIDCLIP_OPTIONS = {"negative_smoothing": 0.2, "peer_weight": 1.0,
                       "cross_weight": 1.0, "distributed": "auto"}
# Term name -> (image output, text output), and which group it belongs to.
PEER = {"global_short": ("image_emb", SHORT), "local_full": (LOCAL, "text_emb")}
CROSS = {"global_full": ("image_emb", "text_emb"), "local_short": (LOCAL, SHORT)}


def check_pyramidclip_options(cfg):
  """The options with defaults filled in, checked (ValueError naming the fix)."""
  cfg = contrastive.check_options(cfg, "pyramidclip", PYRAMIDCLIP_OPTIONS)
  cfg["negative_smoothing"] = contrastive.check_fraction(
      cfg["negative_smoothing"], "negative_smoothing", "pyramidclip")
  for name in ("peer_weight", "cross_weight"):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"config.objective_cfg.pyramidclip.{name}={value!r} must be a "
                       "number >= 0.")
  if cfg["peer_weight"] == 0 and cfg["cross_weight"] == 0:
    raise ValueError("config.objective_cfg.pyramidclip: peer_weight and cross_weight "
                     "are both 0, so there is no loss; set one of them > 0.")
  if cfg["distributed"] not in ("auto", "dense"):
    raise ValueError(f"config.objective_cfg.pyramidclip.distributed="
                     f"{cfg['distributed']!r}; use 'auto' or 'dense'.")
  return cfg


def _term(outputs, image_key, text_key, cfg):
  """(loss, metrics) of L(V, T), averaged over the local crops if V is 'local'."""
  img = outputs[image_key]
  crops = [img] if img.ndim == 2 else [img[:, k] for k in range(img.shape[1])]
  results = [contrastive.clip_with_targets(
      {"image_emb": v, "text_emb": outputs[text_key],
       "logit_scale": outputs["logit_scale"]}, cfg,
      negative_smoothing=cfg["negative_smoothing"]) for v in crops]
  loss = sum(r[0] for r in results) / len(results)
  metrics = {k: sum(r[1][k] for r in results) / len(results)
             for k in ("i2t_acc", "t2i_acc")}
  return loss, metrics


@OBJECTIVES.register(
    "pyramidclip",
    reads=("image_emb", "text_emb", LOCAL, SHORT, "logit_scale"),
    batch_global=True, check=check_pyramidclip_options)
def pyramidclip(outputs, batch, cfg):
  """Peer-level + cross-level softened InfoNCE over the two-level pyramid (module
  docstring). Options: `negative_smoothing` (0.2), `peer_weight` (1.0),
  `cross_weight` (1.0), `distributed` ('auto'|'dense')."""
  del batch
  cfg = check_pyramidclip_options(cfg)
  metrics, groups = {}, {}
  for group, terms in (("peer", PEER), ("cross", CROSS)):
    groups[group] = 0.0
    for name, (image_key, text_key) in terms.items():
      loss, accs = _term(outputs, image_key, text_key, cfg)
      groups[group] += loss
      metrics[f"{name}_loss"] = loss
      if name == "global_full":  # The pair plain CLIP trains: comparable accuracies.
        metrics.update(accs)
  total = cfg["peer_weight"] * groups["peer"] + cfg["cross_weight"] * groups["cross"]
  metrics.update(loss=total, peer_loss=groups["peer"], cross_loss=groups["cross"],
                 logit_scale=jnp.asarray(outputs["logit_scale"], jnp.float32))
  return total, metrics
