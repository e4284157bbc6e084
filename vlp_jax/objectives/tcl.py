"""TCL's contrastive objective (Yang et al., CVPR 2022, "Vision-Language Pre-Training
with Triple Contrastive Learning"), as in the official code (uta-smile/TCL,
models/model_pretrain.py): the mean of six terms.

Inputs (G = global batch, Q = queue rows, s = the logit scale = 1/temp):

    u = image_emb           online image, view 1 (batch['image'])
    v = text_emb            online text
    u' = teacher_view_emb/aug[:, 0]   momentum image, view 2 (batch['views/aug'])
    v' = teacher_text_emb             momentum text (the same tokens)
    Qi, Qt = queue/image, queue/text  earlier steps' u', v' (vlp_jax/train/queue.py)
    I = [u' ; Qi], T = [v' ; Qt]      [G + Q, D] candidates; the positive of row i is i

CMA (cross-modal alignment, ALBEF's ITC with momentum distillation):
    cma_i2t = mean_i -sum_c y_ic log softmax_c(s u_i . T_c), with the (no-gradient)
    targets y_i = alpha softmax(s u'_i . T) + (1 - alpha) onehot(i); cma_t2i likewise
    with v, v', I.
IMC (intra-modal contrast), one-hot targets:
    imc_i2i = CE(s u . I^T, i), imc_t2t = CE(s v . T^T, i).
LMI (local mutual information, global-to-local, in-batch only: no queue):
    momentum locals l_ik: image = the teacher's projected patch tokens of view 2, each
    L2-normalised, then average-pooled on the patch grid (side b = sqrt(N)) with
    kernel = stride = sqrt(b) (official `patch_pooling`: normalise first, the pooled
    vectors are not re-normalised); text = the teacher's projected text positions 1:
    (position 0 is the global's), each L2-normalised, with mask m_ik =
    teacher_text_local_mask[:, 1:]. For every real local (i, k) as anchor:
        loss_ik = -log( e^{s l_ik.g_i} / (e^{s l_ik.g_i} + sum_{j != i, k' real}
                                                          e^{s l_jk'.g_i}) )
    with g_i the online global (u_i or v_i); lmi = mean_i (sum_k m_ik loss_ik /
    sum_k m_ik) (image: every m = 1).

    loss = (lmi_text + lmi_image + cma_i2t + cma_t2i + imc_i2i + imc_t2t) / 6

alpha ramps linearly from 0 to `alpha` over `alpha_warmup_steps` (official: the
first epoch, alpha * min(1, i / len(loader)); 0 = constant). The logit scale is the
model's learnable one, clamped below at `min_logit_scale` with a straight-through
gradient (TCL clamps temp to [0.001, 0.5] in place: the upper clamp 1/0.001 is
config.model.logit_scale_max).

All terms use the global batch (the official code uses each GPU's local batch, the
queue holding gathered rows); the TCL model's ITM and MLM losses need its fusion
encoder and are not part of this dual-encoder objective.
"""
import math

import jax
import jax.numpy as jnp

from vlp_jax import errors
from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

NAME = "tcl"
VIEW = "aug"  # The view group of the momentum image view (config.data.views.aug).
READS = ("image_emb", "text_emb", "logit_scale", f"teacher_view_emb/{VIEW}",
         "teacher_text_emb", f"teacher_view_local_emb/{VIEW}", "teacher_text_local_emb",
         "teacher_text_local_mask", "queue/image", "queue/text")
TCL_OPTIONS = {"alpha": 0.4, "alpha_warmup_steps": 0, "min_logit_scale": 2.0}
TERMS = ("cma_i2t", "cma_t2i", "imc_i2i", "imc_t2t", "lmi_image", "lmi_text")
_NEG = -1e30  # Masked logits: exp underflows to exactly 0 against any real logit.


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _normalize(x):
  x = _f32(x)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_tcl_options(cfg):
  """The options with defaults filled in, checked (ValueError naming the fix)."""
  cfg = contrastive.check_options(cfg, NAME, TCL_OPTIONS)
  alpha = float(cfg["alpha"])
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"config.objective_cfg.tcl.alpha={alpha} must be in [0, 1] (the "
                     "weight of the momentum-distillation targets; TCL: 0.4).")
  warm = cfg["alpha_warmup_steps"]
  if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
    raise ValueError(f"config.objective_cfg.tcl.alpha_warmup_steps={warm!r} must be an "
                     "integer >= 0 (steps of the linear ramp of alpha from 0; TCL: one "
                     "epoch; 0 = constant alpha).")
  if not float(cfg["min_logit_scale"]) >= 0.0:
    raise ValueError(f"config.objective_cfg.tcl.min_logit_scale="
                     f"{cfg['min_logit_scale']} must be >= 0 (TCL: 1 / 0.5 = 2).")
  return cfg


def alpha_at(step, alpha, warmup_steps):
  """alpha * min(1, step / warmup_steps) (constant alpha for warmup_steps = 0)."""
  if not warmup_steps:
    return jnp.float32(alpha)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / float(warmup_steps), 1.0)
  return jnp.float32(alpha) * frac


def soft_ce(logits, targets):
  """Mean over rows of -sum_c targets log_softmax(logits)."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def cma_loss(online, teacher, candidates, scale, alpha):
  """ITC with momentum distillation: `online` [G, D] against `candidates` [G + Q, D]
  (teacher batch first), targets alpha softmax(teacher . candidates) + (1 - alpha)
  one-hot, no gradient through the targets."""
  g, c = online.shape[0], candidates.shape[0]
  onehot = jnp.eye(g, c, dtype=jnp.float32)
  t_logits = jax.lax.stop_gradient(scale) * (teacher @ candidates.T)
  targets = jax.lax.stop_gradient(alpha * jax.nn.softmax(t_logits, axis=-1) +
                                  (1.0 - alpha) * onehot)
  return soft_ce(scale * (online @ candidates.T), targets)


def imc_loss(online, candidates, scale):
  """One-hot InfoNCE of `online` [G, D] against `candidates` [G + Q, D] (row i's
  positive is candidate i)."""
  onehot = jnp.eye(online.shape[0], candidates.shape[0], dtype=jnp.float32)
  return soft_ce(scale * (online @ candidates.T), onehot)


def pool_patches(locals_):
  """TCL's `patch_pooling`: [G, N, D] patch features on a b x b grid (N = b^2) ->
  [G, c^2, D] averages over c x c blocks (kernel = stride = c = sqrt(b)). A grid side
  that is not a square is a ConfigError (the official reshape is wrong for it)."""
  g, n, d = locals_.shape
  b = math.isqrt(n)
  c = math.isqrt(b)
  if b * b != n or c * c != b:
    raise errors.ConfigError(
        f"TCL's local image features pool a b x b patch grid with kernel = stride = "
        f"sqrt(b), which needs b to be a perfect square; the image tower gives {n} "
        f"patch tokens (grid {math.sqrt(n):g} x {math.sqrt(n):g}). Choose "
        "config.data.image_size (and the view size) so that size / patch_size is 4, "
        "9, 16, 25, ... (e.g. 256 px at patch 16, as TCL).")
  x = locals_.reshape(g, c, c, c, c, d)  # (grid row = r c + i, grid col = s c + j).
  return jnp.mean(x, axis=(2, 4)).reshape(g, c * c, d)


def lmi_loss(locals_, globals_, scale, mask=None):
  """Global-to-local InfoNCE, in batch: each real local (i, k) [G, n, D] is scored
  against global i [G, D]; the negatives of every anchor of sample i are all real
  locals of the other samples against global i. Mean over real locals per sample,
  then over samples; `mask` [G, n] (1 = real; None = all)."""
  g, n, _ = locals_.shape
  mask = jnp.ones((g, n), jnp.float32) if mask is None else _f32(mask)
  sim = scale * jnp.einsum("id,jkd->ijk", globals_, locals_)  # [G (global), G, n]
  pos = jnp.einsum("iik->ik", sim)  # [G, n]
  neg_ok = (1.0 - jnp.eye(g, dtype=jnp.float32))[:, :, None] * mask[None, :, :]
  neg = jax.nn.logsumexp(jnp.where(neg_ok > 0, sim, _NEG).reshape(g, g * n), axis=-1)
  per_local = jnp.logaddexp(pos, neg[:, None]) - pos  # -log softmax of the positive.
  per_sample = jnp.sum(per_local * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1),
                                                               1.0)
  return jnp.mean(per_sample)


def _one_view(x, name):
  if x.ndim < 3 or x.shape[1] != 1:
    raise errors.ConfigError(
        f"Objective 'tcl' reads one momentum view per example, but '{name}' has shape "
        f"{tuple(x.shape)}: set config.data.views.{VIEW}.count=1.")
  return x[:, 0]


def tcl_terms(outputs, alpha, min_logit_scale=0.0):
  """{term: float32 scalar} of the six terms (`TERMS`) and 'logit_scale'."""
  # Clamped in value, with a straight-through gradient: TCL clamps the parameter in
  # place, so a temperature pushed past the bound can come back; a plain maximum
  # would give it zero gradient below the bound for good.
  raw = _f32(outputs["logit_scale"])
  scale = raw + jax.lax.stop_gradient(jnp.maximum(raw, float(min_logit_scale)) - raw)
  u, v = _f32(outputs["image_emb"]), _f32(outputs["text_emb"])
  # Teacher outputs and queues already carry no gradient (train/teacher.py, queue.py);
  # they are stopped again here so that the objective alone guarantees it.
  sg = jax.lax.stop_gradient
  um = sg(_f32(_one_view(outputs[f"teacher_view_emb/{VIEW}"], f"view_emb/{VIEW}")))
  vm = sg(_f32(outputs["teacher_text_emb"]))
  images = jnp.concatenate([um, sg(_f32(outputs["queue/image"]))], axis=0)
  texts = jnp.concatenate([vm, sg(_f32(outputs["queue/text"]))], axis=0)
  img_locals = sg(pool_patches(_normalize(_one_view(
      outputs[f"teacher_view_local_emb/{VIEW}"], f"view_local_emb/{VIEW}"))))
  txt_locals = sg(_normalize(outputs["teacher_text_local_emb"][:, 1:]))
  txt_mask = sg(_f32(outputs["teacher_text_local_mask"][:, 1:]))
  return {
      "cma_i2t": cma_loss(u, um, texts, scale, alpha),
      "cma_t2i": cma_loss(v, vm, images, scale, alpha),
      "imc_i2i": imc_loss(u, images, scale),
      "imc_t2t": imc_loss(v, texts, scale),
      "lmi_image": lmi_loss(img_locals, u, scale),
      "lmi_text": lmi_loss(txt_locals, v, scale, txt_mask),
      "logit_scale": scale,
  }


@OBJECTIVES.register(NAME, reads=READS, batch_keys=("step",), batch_global=True,
                     check=check_tcl_options)
def tcl(outputs, batch, cfg):
  """TCL's loss_ita (the mean of its six contrastive terms, module docstring).
  Options: `alpha` (0.4), `alpha_warmup_steps` (0 = constant), `min_logit_scale`
  (2.0 = TCL's temp <= 0.5)."""
  cfg = check_tcl_options(cfg)
  alpha = alpha_at(batch["step"], float(cfg["alpha"]), cfg["alpha_warmup_steps"])
  terms = tcl_terms(outputs, alpha, cfg["min_logit_scale"])
  loss = sum(terms[t] for t in TERMS) / len(TERMS)
  return loss, dict(terms, loss=loss, alpha=alpha)
