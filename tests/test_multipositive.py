"""UniCL (multi-positive contrastive) against a NumPy float64 loop reference.

The reference follows the paper's construction (UniCL, Yang et al. 2022): caption
pairs (label 0) are relabelled to fresh class ids max_label + 1, ..., then T_ij =
[y_i == y_j] (OR equal image ids with `same_image`), each row normalised by its own
number of positives; negatives get alpha / (B - |P(i)|) with `negative_smoothing`.
The 8-device counterpart is tests/multidevice/test_multipositive_md.py.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_accumulate
from tests.test_objectives import _f32, _log_softmax_row, _normalized, _num_grad
from vlp_jax.objectives import combine
from vlp_jax.objectives import multipositive
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import step as step_lib

LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- NumPy reference


def ref_targets(label, image_id, same_image):
  """T [B, B] 0/1: the paper's `targetM` (captions get fresh unique labels)."""
  b = len(label)
  y = [int(v) for v in label]
  fresh = max(max(y), 0) + 1
  for k in range(b):
    if y[k] <= 0:
      y[k] = fresh
      fresh += 1
  t = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      if y[i] == y[j] or (same_image and image_id[i] == image_id[j]):
        t[i, j] = 1.0
  return t


def ref_unicl(img, txt, scale, label, image_id, same_image=False, alpha=0.0):
  b = img.shape[0]
  pos = ref_targets(label, image_id, same_image)
  logits = scale * (img @ txt.T)
  total = 0.0
  for direction in range(2):
    for i in range(b):
      row = [logits[i, j] if direction == 0 else logits[j, i] for j in range(b)]
      mask = [pos[i, j] if direction == 0 else pos[j, i] for j in range(b)]
      logp = _log_softmax_row(row)
      n_pos = sum(mask)
      for j in range(b):
        if mask[j]:
          target = (1.0 - alpha) / n_pos if n_pos < b else 1.0 / n_pos
        else:
          target = alpha / (b - n_pos)
        total -= target * logp[j]
  return 0.5 * total / b


def ref_accuracies(img, txt, scale, label, image_id, same_image=False):
  pos = ref_targets(label, image_id, same_image)
  logits = scale * (img @ txt.T)
  b = img.shape[0]
  i2t = np.mean([pos[i, np.argmax(logits[i, :])] for i in range(b)])
  t2i = np.mean([pos[np.argmax(logits[:, j]), j] for j in range(b)])
  return i2t, t2i, pos.sum() / b


# ----------------------------------------------------------------------------- tests


@functools.cache
def _value_and_grad(same_image):
  """Jitted (loss, i2t, t2i, positives), grads of the dense loss; alpha is traced."""
  def fn(img, txt, scale, label, image_id, alpha):
    loss, *aux = multipositive.unicl_loss_from_embeddings(
        img, txt, scale, label, image_id, same_image=same_image,
        negative_smoothing=alpha)
    return loss, aux
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))


CASES = {
    # Duplicate class labels, captions without labels.
    "classes_and_captions": ([0, 3, 3, 0, 5, 3, 0, 5], list(range(8)), False, 0.0),
    "softened_negatives": ([0, 3, 3, 0, 5, 3, 0, 5], list(range(8)), False, 0.2),
    # Several captions per image (labels 0, equal image ids).
    "same_image_groups": ([0] * 8, [7, 7, 2, 9, 9, 9, 4, 7], True, 0.0),
    # Classes and image groups together (combined by OR), softened.
    "classes_or_images": ([4, 0, 4, 0, 0, 6, 6, 0], [1, 2, 3, 2, 5, 5, 8, 9], True,
                          0.1),
    # One class: every candidate a positive, no negatives to smooth onto.
    "one_class": ([2] * 8, list(range(8)), False, 0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unicl_matches_reference(case):
  label, image_id, same_image, alpha = CASES[case]
  b = len(label)
  rng = np.random.default_rng(len(case))
  img, txt = _normalized(rng, b), _normalized(rng, b)
  if case == "classes_and_captions":
    txt[2] = txt[1]  # Equal class prompts: tied logits.
  scale = float(_f32(rng.uniform(2.0, 12.0)))
  label, image_id = np.asarray(label, np.int32), np.asarray(image_id, np.int32)

  (loss, (i2t, t2i, positives)), grads = _value_and_grad(same_image)(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(scale),
      label, image_id, jnp.float32(alpha))

  ref = functools.partial(ref_unicl, label=label, image_id=image_id,
                          same_image=same_image, alpha=alpha)
  np.testing.assert_allclose(loss, ref(img, txt, scale), rtol=LOSS_RTOL)
  ref_i2t, ref_t2i, ref_pos = ref_accuracies(img, txt, scale, label, image_id,
                                             same_image)
  np.testing.assert_allclose([i2t, t2i, positives], [ref_i2t, ref_t2i, ref_pos],
                             rtol=1e-6)
  np.testing.assert_allclose(grads[0], _num_grad(lambda x: ref(x, txt, scale), img),
                             **GRAD_TOL)
  np.testing.assert_allclose(grads[1], _num_grad(lambda x: ref(img, x, scale), txt),
                             **GRAD_TOL)
  np.testing.assert_allclose(
      grads[2], _num_grad(lambda x: ref(img, txt, float(x)), np.float64(scale)),
      **GRAD_TOL)


@functools.cache
def _jitted_objective(name, cfg_items):
  fn = OBJECTIVES.get(name)
  cfg = dict(cfg_items)

  def loss(img, txt, scale, batch):
    return fn({"image_emb": img, "text_emb": txt, "logit_scale": scale}, batch, cfg)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def objective_value_and_grad(name, cfg):
  """Jitted value_and_grad of objective `name` over (img, txt, scale, batch)."""
  return _jitted_objective(name, tuple(sorted(cfg.items())))


@pytest.mark.parametrize("alpha", [0.0, 0.15])
def test_unique_labels_equal_clip(alpha):
  """Captions only, or every class once (and distinct images): exactly `clip`."""
  b = 7
  rng = np.random.default_rng(11)
  args = (jnp.asarray(_normalized(rng, b), jnp.float32),
          jnp.asarray(_normalized(rng, b), jnp.float32), jnp.float32(6.0))
  (ref_loss, ref_m), ref_g = objective_value_and_grad(
      "clip", {"negative_smoothing": alpha})(*args, {})
  unicl = objective_value_and_grad(
      "unicl", {"negative_smoothing": alpha, "same_image": True})
  for label in (np.zeros(b, np.int32), np.arange(1, b + 1, dtype=np.int32)):
    batch = {"label": label, "image_id": np.arange(b, dtype=np.int32) * 3}
    (loss, m), g = unicl(*args, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for key in ("i2t_acc", "t2i_acc", "logit_scale"):
      np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-6)
    assert float(m["positives"]) == pytest.approx(1.0)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
                 g, ref_g)


def test_same_image_off_ignores_image_ids():
  b = 7
  rng = np.random.default_rng(12)
  args = (jnp.asarray(_normalized(rng, b), jnp.float32),
          jnp.asarray(_normalized(rng, b), jnp.float32), jnp.float32(4.0))
  batch = {"label": np.zeros(b, np.int32), "image_id": np.zeros(b, np.int32)}
  (loss_off, m_off), _ = objective_value_and_grad(
      "unicl", {"negative_smoothing": 0.0, "same_image": False})(*args, batch)
  (loss_clip, _), _ = objective_value_and_grad(
      "clip", {"negative_smoothing": 0.0})(*args, {})
  np.testing.assert_allclose(loss_off, loss_clip, rtol=1e-6)
  (loss_on, m_on), _ = objective_value_and_grad(
      "unicl", {"negative_smoothing": 0.0, "same_image": True})(*args, batch)
  assert float(m_off["positives"]) == pytest.approx(1.0)
  assert float(m_on["positives"]) == pytest.approx(b)
  assert abs(float(loss_on) - float(loss_off)) > 1e-3


def test_unicl_option_errors():
  outputs = {"image_emb": np.eye(4, dtype=np.float32),
             "text_emb": np.eye(4, dtype=np.float32), "logit_scale": 1.0}
  batch = {"label": np.zeros(4, np.int32), "image_id": np.arange(4, dtype=np.int32)}
  fn = OBJECTIVES.get("unicl")
  with pytest.raises(ValueError, match="Unknown option 'same_images'.*'same_image'"):
    fn(outputs, batch, {"same_images": True})
  with pytest.raises(ValueError, match=r"negative_smoothing=1.0 must be in \[0, 1\)"):
    fn(outputs, batch, {"negative_smoothing": 1.0})
  with pytest.raises(ValueError, match="same_image='yes' must be True or False"):
    fn(outputs, batch, {"same_image": "yes"})
  with pytest.raises(ValueError, match="distributed='ring'"):
    fn(outputs, batch, {"distributed": "ring"})
  info = OBJECTIVES.info("unicl")
  assert info["batch_keys"] == ("label", "image_id") and info["batch_global"]


class TinyTwoTower(nn.Module):
  """Linear 'towers' on feature vectors: cheap to compile, enough for accumulation."""

  @nn.compact
  def __call__(self, batch, train=False):
    del train
    def embed(x, name):
      y = nn.Dense(8, name=name)(x)
      return y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    log_scale = self.param("logit_scale", nn.initializers.constant(np.log(5.0)), ())
    return {"image_emb": embed(batch["image"], "image"),
            "text_emb": embed(batch["text"], "text"), "logit_scale": jnp.exp(log_scale)}


ACCUM_OBJECTIVES = (("unicl", 1.0, {"same_image": True, "negative_smoothing": 0.1}),
                    ("lightclip", 0.5, {"ramp_steps": 10}))


def _labelled(batch, b):
  return dict(batch, label=jnp.asarray([0, 3, 3, 0, 5, 0, 3, 0] * (b // 8), jnp.int32),
              image_id=jnp.arange(b, dtype=jnp.int32) // 2, step=jnp.int32(5))


def _check_accumulation(model, params, batch):
  objectives = [combine.from_registry(*o) for o in ACCUM_OBJECTIVES]
  rng = jax.random.PRNGKey(0)

  def grads(accum_steps):
    fn = jax.jit(lambda p, bt: step_lib.gradients(p, model, objectives, bt, rng,
                                                  accum_steps))
    return jax.device_get(fn(params, batch))

  ref_g, ref_m = grads(1)
  g, m = grads(4)
  test_accumulate.assert_grads_close(g, ref_g)
  assert set(m) == set(ref_m) >= {"unicl/loss", "unicl/positives", "lightclip/loss",
                                  "lightclip/smoothing"}
  jax.tree.map(test_accumulate.assert_close, m, ref_m)
  np.testing.assert_allclose(m["lightclip/smoothing"], 0.05, rtol=1e-6)
  assert float(m["unicl/positives"]) > 1.0
  return ref_g


def test_accumulation_equals_full_batch():
  """unicl (same_image, softened) + lightclip (mid-ramp step, read from the batch):
  accum_steps=4 gives the gradient and metrics of accum_steps=1."""
  rng = np.random.default_rng(13)
  b = 16
  batch = _labelled({"image": jnp.asarray(rng.normal(size=(b, 6)), jnp.float32),
                     "text": jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)}, b)
  model = TinyTwoTower()
  params = model.init(jax.random.PRNGKey(1), batch)["params"]
  ref_g = _check_accumulation(model, params, batch)
  assert abs(float(ref_g["logit_scale"])) > 1e-5


@pytest.mark.slow
def test_accumulation_equals_full_batch_two_tower():
  """The same with the tiny two-tower ViT model and a real training batch."""
  exp, params = test_accumulate.setup(test_accumulate.clip_config)
  batch = jax.tree.map(jnp.asarray, test_accumulate.batches()[0])
  ref_g = _check_accumulation(exp.model, params,
                              _labelled(batch, jax.tree.leaves(batch)[0].shape[0]))
  assert abs(float(ref_g["scale"]["logit_scale"])) > 1e-5
