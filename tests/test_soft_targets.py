"""Soft contrastive targets against NumPy float64 loop references: `clip` with
softened negatives (PyramidCLIP-style) and `lightclip`'s progressive schedule.

The 8-device counterparts are in tests/multidevice/test_multipositive_md.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_multipositive
from tests.test_objectives import _f32, _log_softmax_row, _normalized, _num_grad
from vlp_jax.objectives import soft_targets
from vlp_jax.registry import OBJECTIVES

LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
B = 7


def ref_soft_clip(img, txt, scale, alpha, spread="negatives"):
  """Symmetric CE; row i's target: 1 - alpha on i and alpha / (N - 1) on each
  negative ('negatives'), or (1 - alpha) [i == j] + alpha / N ('all')."""
  n = img.shape[0]
  logits = scale * (img @ txt.T)
  total = 0.0
  for direction in range(2):
    for i in range(n):
      row = [logits[i, j] if direction == 0 else logits[j, i] for j in range(n)]
      logp = _log_softmax_row(row)
      for j in range(n):
        if spread == "negatives":
          target = 1.0 - alpha if i == j else alpha / (n - 1)
        else:
          target = (1.0 - alpha) * (i == j) + alpha / n
        total -= target * logp[j]
  return 0.5 * total / n


def ref_schedule(step, initial, final, ramp_steps, every=1):
  held = (step // every) * every
  return initial + (final - initial) * min(held / ramp_steps, 1.0)


value_and_grad = test_multipositive.objective_value_and_grad


def _inputs(seed):
  rng = np.random.default_rng(seed)
  img, txt = _normalized(rng, B), _normalized(rng, B)
  scale = float(_f32(rng.uniform(2.0, 12.0)))
  return img, txt, scale, (jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                           jnp.float32(scale))


def _check_grads(grads, ref, img, txt, scale):
  np.testing.assert_allclose(grads[0], _num_grad(lambda x: ref(x, txt, scale), img),
                             **GRAD_TOL)
  np.testing.assert_allclose(grads[1], _num_grad(lambda x: ref(img, x, scale), txt),
                             **GRAD_TOL)
  np.testing.assert_allclose(
      grads[2], _num_grad(lambda x: ref(img, txt, float(x)), np.float64(scale)),
      **GRAD_TOL)


# ------------------------------------------------------------- clip, softened negatives


def test_clip_negative_smoothing_matches_reference():
  img, txt, scale, args = _inputs(0)
  alpha = 0.2
  (loss, metrics), grads = value_and_grad("clip", {"negative_smoothing": alpha})(
      *args, {})
  ref = functools.partial(ref_soft_clip, alpha=alpha)
  np.testing.assert_allclose(loss, ref(img, txt, scale), rtol=LOSS_RTOL)
  assert set(metrics) == {"loss", "i2t_acc", "t2i_acc", "logit_scale"}
  _check_grads(grads, ref, img, txt, scale)
  # Not label smoothing: that puts alpha / N on the positive too.
  (ls_loss, _), _ = value_and_grad("clip", {"label_smoothing": alpha})(*args, {})
  np.testing.assert_allclose(ls_loss, ref_soft_clip(img, txt, scale, alpha, "all"),
                             rtol=LOSS_RTOL)
  assert abs(float(ls_loss) - float(loss)) > 1e-4


def test_clip_smoothing_zero_is_plain_clip():
  _, _, _, args = _inputs(1)
  (plain, _), g_plain = value_and_grad("clip", {})(*args, {})
  (zero, _), g_zero = value_and_grad("clip", {"negative_smoothing": 0.0})(*args, {})
  np.testing.assert_array_equal(zero, plain)
  jax.tree.map(np.testing.assert_array_equal, g_zero, g_plain)


def test_clip_option_errors():
  outputs = {"image_emb": np.eye(3, dtype=np.float32),
             "text_emb": np.eye(3, dtype=np.float32), "logit_scale": 1.0}
  fn = OBJECTIVES.get("clip")
  with pytest.raises(ValueError, match="both label_smoothing=0.1.*negative_smoothing"):
    fn(outputs, {}, {"label_smoothing": 0.1, "negative_smoothing": 0.1})
  with pytest.raises(ValueError, match=r"clip.negative_smoothing=-0.1 must be in"):
    fn(outputs, {}, {"negative_smoothing": -0.1})
  with pytest.raises(ValueError, match=r"Unknown option 'negative_smooting'.*Did you "
                                       r"mean 'negative_smoothing'"):
    fn(outputs, {}, {"negative_smooting": 0.1})


# -------------------------------------------------------------- lightclip, progressive


def test_schedule():
  for step, every in ((0, 1), (1, 1), (5, 1), (10, 1), (25, 1), (5, 4), (9, 4), (12, 4)):
    np.testing.assert_allclose(
        soft_targets.smoothing_at(jnp.int32(step), 0.05, 0.25, 10, every),
        ref_schedule(step, 0.05, 0.25, 10, every), rtol=1e-6)
  # A decreasing ramp works too.
  np.testing.assert_allclose(soft_targets.smoothing_at(5, 0.2, 0.0, 10), 0.1, rtol=1e-6)


@pytest.mark.parametrize("step", [0, 4, 10, 30])
def test_lightclip_matches_reference(step):
  """Step 0: plain CLIP; mid-ramp; end of the ramp; past it (held at the final)."""
  img, txt, scale, args = _inputs(2)
  cfg = {"final_smoothing": 0.2, "ramp_steps": 10}
  (loss, metrics), grads = value_and_grad("lightclip", cfg)(
      *args, {"step": jnp.int32(step)})
  alpha = ref_schedule(step, 0.0, 0.2, 10)
  ref = functools.partial(ref_soft_clip, alpha=alpha)
  np.testing.assert_allclose(metrics["smoothing"], alpha, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss, ref(img, txt, scale), rtol=LOSS_RTOL)
  assert set(metrics) == {"loss", "i2t_acc", "t2i_acc", "logit_scale", "smoothing"}
  if step == 0:
    (clip_loss, _), clip_grads = value_and_grad("clip", {})(*args, {})
    np.testing.assert_allclose(loss, clip_loss, rtol=1e-6)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
                 grads, clip_grads)
  if step == 4:
    _check_grads(grads, ref, img, txt, scale)


def test_lightclip_spread_all_is_scheduled_label_smoothing():
  img, txt, scale, args = _inputs(3)
  cfg = {"initial_smoothing": 0.1, "final_smoothing": 0.3, "ramp_steps": 8,
         "update_every": 4, "spread": "all"}
  (loss, metrics), _ = value_and_grad("lightclip", cfg)(*args, {"step": jnp.int32(6)})
  np.testing.assert_allclose(metrics["smoothing"], 0.2, rtol=1e-6)  # Held from step 4.
  np.testing.assert_allclose(loss, ref_soft_clip(img, txt, scale, 0.2, "all"),
                             rtol=LOSS_RTOL)


def test_lightclip_option_errors():
  outputs = {"image_emb": np.eye(3, dtype=np.float32),
             "text_emb": np.eye(3, dtype=np.float32), "logit_scale": 1.0}
  batch = {"step": np.int32(0)}
  fn = OBJECTIVES.get("lightclip")
  with pytest.raises(ValueError, match=r"needs config.objective_cfg.lightclip.ramp_steps"
                                       r".*config.total_steps"):
    fn(outputs, batch, {})
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="ramp_steps=.* must be a positive integer"):
      fn(outputs, batch, {"ramp_steps": bad})
  with pytest.raises(ValueError, match="update_every=0 must be a positive integer"):
    fn(outputs, batch, {"ramp_steps": 5, "update_every": 0})
  with pytest.raises(ValueError, match=r"final_smoothing=1.0 must be in \[0, 1\)"):
    fn(outputs, batch, {"ramp_steps": 5, "final_smoothing": 1.0})
  with pytest.raises(ValueError, match="spread='positives'; use one of"):
    fn(outputs, batch, {"ramp_steps": 5, "spread": "positives"})
  with pytest.raises(ValueError, match="Unknown option 'label_smoothing'"):
    fn(outputs, batch, {"ramp_steps": 5, "label_smoothing": 0.1})
  info = OBJECTIVES.info("lightclip")
  assert info["batch_keys"] == ("step",) and info["batch_global"]
