"""LightCLIP's instance-level alignment: CLIP with progressively softened labels.

LightCLIP (Nie et al. 2023, arXiv 2312.00674) softens "the label of negative
samples progressively" over training. With N = B candidates per row and the
smoothing alpha(step) of the step being computed, row i's targets are

    spread 'negatives' (default):  t_ii = 1 - alpha,  t_ij = alpha / (N - 1)  (j != i)
    spread 'all':                  t_ij = (1 - alpha) [i == j] + alpha / N

and the loss is CLIP's symmetric cross-entropy against them (both directions, mean
of the two; `contrastive.clip_with_targets`, dense or sharded). The schedule ramps
linearly from `initial_smoothing` at step 0 to `final_smoothing` at `ramp_steps`
and stays there:

    alpha(step) = a0 + (a1 - a0) * min(floor(step / every) * every / ramp_steps, 1)

with `every` = `update_every` (1: every step; steps_per_epoch: a per-epoch
staircase). alpha(0) = a0 = 0 gives plain CLIP at the start of training.

Unconfirmed against the paper's method section (only its abstract could be read):
the uniform spread over the negatives, the linear ramp and the default final value
0.1. The paper's token-level alignment (relaxed bipartite matching between patches
and words) and its MLM branch are not implemented here.
"""
import jax.numpy as jnp

from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

LIGHTCLIP_OPTIONS = {"initial_smoothing": 0.0, "final_smoothing": 0.1,
                     "ramp_steps": None, "update_every": 1, "spread": "negatives",
                     "distributed": "auto"}
_SPREADS = ("negatives", "all")


def _positive_int(value, name, hint=""):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.objective_cfg.lightclip.{name}={value!r} must be a "
                     f"positive integer{hint}.")
  return value


def check_lightclip_options(cfg):
  """The options with defaults filled in, checked (ValueError naming the fix)."""
  cfg = contrastive.check_options(cfg, "lightclip", LIGHTCLIP_OPTIONS)
  for name in ("initial_smoothing", "final_smoothing"):
    cfg[name] = contrastive.check_fraction(cfg[name], name, "lightclip")
  if cfg["ramp_steps"] is None:
    raise ValueError("Objective 'lightclip' needs config.objective_cfg.lightclip."
                     "ramp_steps: the steps over which the smoothing reaches "
                     "final_smoothing (e.g. config.total_steps).")
  _positive_int(cfg["ramp_steps"], "ramp_steps", " (e.g. config.total_steps)")
  _positive_int(cfg["update_every"], "update_every",
                " (1: every step; steps per epoch: once an epoch)")
  if cfg["spread"] not in _SPREADS:
    raise ValueError(f"config.objective_cfg.lightclip.spread={cfg['spread']!r}; use "
                     f"one of {_SPREADS}.")
  return cfg


def smoothing_at(step, initial, final, ramp_steps, update_every=1):
  """alpha(step) of the linear ramp above, a float32 scalar (`step` may be traced)."""
  step = jnp.asarray(step, jnp.int32)
  held = (step // update_every) * update_every
  frac = jnp.clip(held.astype(jnp.float32) / float(ramp_steps), 0.0, 1.0)
  return jnp.float32(initial) + (float(final) - float(initial)) * frac


@OBJECTIVES.register("lightclip", reads=("image_emb", "text_emb", "logit_scale"),
                     batch_keys=("step",), batch_global=True,
                     check=check_lightclip_options)
def lightclip(outputs, batch, cfg):
  """CLIP with progressively softened labels. Options: `initial_smoothing` (0.0),
  `final_smoothing` (0.1), `ramp_steps` (required), `update_every` (1), `spread`
  ('negatives'|'all'), `distributed` ('auto'|'dense')."""
  cfg = check_lightclip_options(cfg)
  alpha = smoothing_at(batch["step"], cfg["initial_smoothing"], cfg["final_smoothing"],
                       cfg["ramp_steps"], cfg["update_every"])
  if cfg["spread"] == "negatives":
    loss, metrics = contrastive.clip_with_targets(outputs, cfg, negative_smoothing=alpha)
  else:
    loss, metrics = contrastive.clip_with_targets(outputs, cfg, label_smoothing=alpha)
  metrics["smoothing"] = alpha
  return loss, metrics
