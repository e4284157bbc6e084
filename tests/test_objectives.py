"""Reference tests for the training objectives against loop-based NumPy float64 code."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import vlp_jax.objectives  # noqa: F401  (registers the objectives)
from vlp_jax.objectives import caption as caption_lib
from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

D = 16
V = 11
LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- helpers


def _f32(x):
  """Rounds to float32 and returns float64, so both sides see identical inputs."""
  return np.asarray(x, np.float32).astype(np.float64)


def _normalized(rng, b):
  x = rng.normal(size=(b, D))
  return _f32(x / np.linalg.norm(x, axis=-1, keepdims=True))


def _log_softmax_row(row):
  m = max(row)
  lse = m + np.log(sum(np.exp(v - m) for v in row))
  return [v - lse for v in row]


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x)) if x >= 0 else x - np.log1p(np.exp(x))


def _num_grad(f, x, h=1e-6):
  """Central finite differences of scalar `f` at float64 array `x` (any shape)."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  flat, gflat = x.reshape(-1), g.reshape(-1)
  for k in range(flat.size):
    orig = flat[k]
    flat[k] = orig + h
    up = f(x)
    flat[k] = orig - h
    down = f(x)
    flat[k] = orig
    gflat[k] = (up - down) / (2 * h)
  return g


# ------------------------------------------------------------------- NumPy references


def ref_clip(img, txt, scale, ls=0.0):
  b = img.shape[0]
  logits = [[scale * float(np.dot(img[i], txt[j])) for j in range(b)] for i in range(b)]
  total = 0.0
  for direction in range(2):
    for i in range(b):
      row = [logits[i][j] if direction == 0 else logits[j][i] for j in range(b)]
      logp = _log_softmax_row(row)
      for j in range(b):
        target = (1.0 - ls) * (1.0 if i == j else 0.0) + ls / b
        total -= target * logp[j]
  return 0.5 * total / b


def ref_clip_acc(img, txt, scale):
  b = img.shape[0]
  logits = np.array(
      [[scale * np.dot(img[i], txt[j]) for j in range(b)] for i in range(b)])
  i2t = np.mean([np.argmax(logits[i, :]) == i for i in range(b)])
  t2i = np.mean([np.argmax(logits[:, j]) == j for j in range(b)])
  return i2t, t2i


def ref_siglip(img, txt, scale, bias):
  b = img.shape[0]
  total = 0.0
  for i in range(b):
    for j in range(b):
      z = 1.0 if i == j else -1.0
      total += _log_sigmoid(z * (scale * float(np.dot(img[i], txt[j])) + bias))
  return -total / b


def ref_caption(logits, text, pad_id=0, ls=0.0):
  bsz, length, vocab = logits.shape
  total, count = 0.0, 0
  for b in range(bsz):
    for t in range(length - 1):
      target = text[b, t + 1]
      if target == pad_id:
        continue
      logp = _log_softmax_row(list(logits[b, t]))
      for v in range(vocab):
        q = (1.0 - ls) * (1.0 if v == target else 0.0) + ls / vocab
        total -= q * logp[v]
      count += 1
  return total / max(count, 1)


def ref_token_acc(logits, text, pad_id=0):
  hits, count = 0, 0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1] - 1):
      if text[b, t + 1] != pad_id:
        hits += int(np.argmax(logits[b, t]) == text[b, t + 1])
        count += 1
  return hits / max(count, 1)


def _random_text(rng, bsz, length, pad_id=0):
  """BOS=1, random caption tokens, EOS=2, then `pad_id`; one row is unpadded."""
  real = [v for v in range(3, V) if v != pad_id]
  text = np.full((bsz, length), pad_id, np.int32)
  for b in range(bsz):
    n = length - 2 if b == 0 else int(rng.integers(0, length - 1))
    text[b, 0] = 1
    text[b, 1:1 + n] = rng.choice(real, size=n)
    text[b, 1 + n] = 2
  return text


# ------------------------------------------------------------------------------ CLIP


@pytest.mark.parametrize("seed,b,ls",
                         [(0, 6, 0.0), (1, 8, 0.0), (2, 7, 0.1), (3, 8, 0.3)])
def test_clip_matches_reference(seed, b, ls):
  rng = np.random.default_rng(seed)
  img, txt = _normalized(rng, b), _normalized(rng, b)
  scale = float(_f32(rng.uniform(1.0, 20.0)))
  cfg = {"label_smoothing": ls}
  fn = OBJECTIVES.get("clip")

  def jax_loss(i, t, s):
    outputs = {"image_emb": i, "text_emb": t, "logit_scale": s}
    return fn(outputs, {}, cfg)

  args = (jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
          jnp.float32(scale))
  (loss, metrics), grads = jax.jit(
      jax.value_and_grad(jax_loss, argnums=(0, 1, 2), has_aux=True))(*args)

  np.testing.assert_allclose(loss, ref_clip(img, txt, scale, ls), rtol=LOSS_RTOL)
  assert set(metrics) == {"loss", "i2t_acc", "t2i_acc", "logit_scale"}
  np.testing.assert_allclose(metrics["loss"], loss)
  i2t, t2i = ref_clip_acc(img, txt, scale)
  np.testing.assert_allclose(metrics["i2t_acc"], i2t, rtol=1e-6)
  np.testing.assert_allclose(metrics["t2i_acc"], t2i, rtol=1e-6)
  np.testing.assert_allclose(metrics["logit_scale"], scale, rtol=1e-6)

  g_img = _num_grad(lambda x: ref_clip(x, txt, scale, ls), img)
  g_txt = _num_grad(lambda x: ref_clip(img, x, scale, ls), txt)
  g_scale = _num_grad(lambda x: ref_clip(img, txt, float(x), ls), np.float64(scale))
  np.testing.assert_allclose(grads[0], g_img, **GRAD_TOL)
  np.testing.assert_allclose(grads[1], g_txt, **GRAD_TOL)
  np.testing.assert_allclose(grads[2], g_scale, **GRAD_TOL)


def test_clip_accuracy_on_perfect_match():
  rng = np.random.default_rng(4)
  emb = _normalized(rng, 8)
  outputs = {"image_emb": emb, "text_emb": emb, "logit_scale": 10.0}
  _, metrics = OBJECTIVES.get("clip")(outputs, {}, {})
  assert float(metrics["i2t_acc"]) == 1.0 and float(metrics["t2i_acc"]) == 1.0
  swapped = dict(outputs, text_emb=emb[::-1])
  _, metrics = OBJECTIVES.get("clip")(swapped, {}, {})
  assert float(metrics["i2t_acc"]) == 0.0 and float(metrics["t2i_acc"]) == 0.0


def test_clip_accepts_configdict_and_bf16_inputs():
  rng = np.random.default_rng(5)
  img, txt = _normalized(rng, 6), _normalized(rng, 6)
  outputs = {"image_emb": jnp.asarray(img, jnp.bfloat16),
             "text_emb": jnp.asarray(txt, jnp.bfloat16),
             "logit_scale": jnp.asarray(5.0, jnp.bfloat16)}
  cfg = ml_collections.ConfigDict({"label_smoothing": 0.2})
  loss, _ = OBJECTIVES.get("clip")(outputs, {}, cfg)
  assert loss.dtype == jnp.float32
  expected = ref_clip(_f32(outputs["image_emb"].astype(jnp.float32)),
                      _f32(outputs["text_emb"].astype(jnp.float32)), 5.0, 0.2)
  np.testing.assert_allclose(loss, expected, rtol=LOSS_RTOL)


def test_clip_helper_matches_objective():
  rng = np.random.default_rng(6)
  img, txt = _normalized(rng, 7), _normalized(rng, 7)
  loss, logits = contrastive.clip_loss_from_embeddings(img, txt, 3.0, label_smoothing=0.1)
  assert logits.shape == (7, 7)
  np.testing.assert_allclose(loss, ref_clip(img, txt, 3.0, 0.1), rtol=LOSS_RTOL)


# ---------------------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("seed,b", [(0, 6), (1, 7), (2, 8)])
def test_siglip_matches_reference(seed, b):
  rng = np.random.default_rng(seed)
  img, txt = _normalized(rng, b), _normalized(rng, b)
  scale = float(_f32(rng.uniform(1.0, 20.0)))
  bias = float(_f32(rng.uniform(-10.0, 2.0)))
  fn = OBJECTIVES.get("siglip")

  def jax_loss(i, t, s, c):
    outputs = {"image_emb": i, "text_emb": t, "logit_scale": s, "logit_bias": c}
    return fn(outputs, {}, {})

  args = (jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
          jnp.float32(scale), jnp.float32(bias))
  (loss, metrics), grads = jax.jit(
      jax.value_and_grad(jax_loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)

  np.testing.assert_allclose(loss, ref_siglip(img, txt, scale, bias), rtol=LOSS_RTOL)
  assert set(metrics) == {"loss", "logit_scale", "logit_bias"}
  np.testing.assert_allclose(metrics["logit_scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(metrics["logit_bias"], bias, rtol=1e-6)

  g_img = _num_grad(lambda x: ref_siglip(x, txt, scale, bias), img)
  g_txt = _num_grad(lambda x: ref_siglip(img, x, scale, bias), txt)
  g_scale = _num_grad(lambda x: ref_siglip(img, txt, float(x), bias), np.float64(scale))
  g_bias = _num_grad(lambda x: ref_siglip(img, txt, scale, float(x)), np.float64(bias))
  np.testing.assert_allclose(grads[0], g_img, **GRAD_TOL)
  np.testing.assert_allclose(grads[1], g_txt, **GRAD_TOL)
  np.testing.assert_allclose(grads[2], g_scale, **GRAD_TOL)
  np.testing.assert_allclose(grads[3], g_bias, **GRAD_TOL)


def test_siglip_is_stable_for_extreme_logits():
  rng = np.random.default_rng(7)
  img = _normalized(rng, 6)
  outputs = {"image_emb": img, "text_emb": -img, "logit_scale": 1e4, "logit_bias": 50.0}
  loss, _ = OBJECTIVES.get("siglip")(outputs, {}, {})
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, ref_siglip(img, -img, 1e4, 50.0), rtol=LOSS_RTOL)


# --------------------------------------------------------------------------- Caption


@pytest.mark.parametrize("seed,bsz,length,ls,pad_id",
                         [(0, 6, 9, 0.0, 0), (1, 7, 8, 0.1, 0), (2, 6, 7, 0.0, 5)])
def test_caption_matches_reference(seed, bsz, length, ls, pad_id):
  rng = np.random.default_rng(seed)
  text = _random_text(rng, bsz, length, pad_id)
  logits = _f32(rng.normal(scale=2.0, size=(bsz, length, V)))
  cfg = {"label_smoothing": ls, "pad_id": pad_id}
  fn = OBJECTIVES.get("caption")

  def jax_loss(lg):
    return fn({"caption_logits": lg}, {"text": jnp.asarray(text)}, cfg)

  (loss, metrics), grad = jax.jit(jax.value_and_grad(jax_loss, has_aux=True))(
      jnp.asarray(logits, jnp.float32))

  np.testing.assert_allclose(loss, ref_caption(logits, text, pad_id, ls), rtol=LOSS_RTOL)
  assert set(metrics) == {"loss", "token_acc"}
  np.testing.assert_allclose(metrics["token_acc"], ref_token_acc(logits, text, pad_id),
                             rtol=1e-6)
  g_ref = _num_grad(lambda x: ref_caption(x, text, pad_id, ls), logits)
  np.testing.assert_allclose(grad, g_ref, **GRAD_TOL)


def test_caption_ignores_padding_positions():
  rng = np.random.default_rng(8)
  bsz, length = 6, 9
  text = _random_text(rng, bsz, length)
  logits = rng.normal(size=(bsz, length, V)).astype(np.float32)
  fn = OBJECTIVES.get("caption")
  cfg = {"label_smoothing": 0.1}
  loss, metrics = fn({"caption_logits": logits}, {"text": text}, cfg)

  # Positions whose target is padding, plus the last position (no target at all).
  masked = np.zeros((bsz, length), bool)
  masked[:, :-1] = text[:, 1:] == 0
  masked[:, -1] = True
  assert masked[:, :-1].any() and not masked[:, :-1].all()
  perturbed = logits.copy()
  perturbed[masked] = rng.normal(scale=50.0, size=(masked.sum(), V))
  loss2, metrics2 = fn({"caption_logits": perturbed}, {"text": text}, cfg)
  np.testing.assert_array_equal(loss, loss2)
  np.testing.assert_array_equal(metrics["token_acc"], metrics2["token_acc"])

  # Perturbing an unmasked position does change the loss.
  perturbed[~masked] += rng.normal(scale=1.0, size=((~masked).sum(), V))
  loss3, _ = fn({"caption_logits": perturbed}, {"text": text}, cfg)
  assert abs(float(loss3) - float(loss)) > 1e-3

  grad = jax.grad(lambda lg: fn({"caption_logits": lg}, {"text": text}, cfg)[0])(logits)
  np.testing.assert_array_equal(np.asarray(grad)[masked], 0.0)


def test_caption_all_padding_is_zero_and_finite():
  logits = np.random.default_rng(9).normal(size=(2, 5, V)).astype(np.float32)
  text = np.zeros((2, 5), np.int32)
  text[:, 0] = 1
  fn = OBJECTIVES.get("caption")
  loss, metrics = fn({"caption_logits": logits}, {"text": text}, {})
  assert float(loss) == 0.0 and float(metrics["token_acc"]) == 0.0
  grad = jax.grad(lambda lg: fn({"caption_logits": lg}, {"text": text}, {})[0])(logits)
  assert np.all(np.isfinite(grad))


# -------------------------------------------------------------------------- Registry


def test_registry_names_and_unknown_objective():
  for name in ("clip", "siglip", "caption"):
    assert name in OBJECTIVES
  assert OBJECTIVES.get("caption") is caption_lib.caption
  with pytest.raises(KeyError, match="clipp"):
    OBJECTIVES.get("clipp")
  with pytest.raises(KeyError):
    OBJECTIVES.get("no_such_objective")
