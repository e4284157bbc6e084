"""FILIP (token-wise late interaction) against a loop-based NumPy float64 reference
written from the paper's equations (Yao et al. 2021, eq. 2-5).

The batch-sharded ring form is tested in tests/multidevice/test_filip_md.py.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from tests.test_objectives import _num_grad
from vlp_jax.models import macs
from vlp_jax.objectives import combine
from vlp_jax.objectives import contrastive
from vlp_jax.objectives import filip
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import step as step_lib

B, N, L, D = 4, 3, 5, 4
LENGTHS = (5, 3, 2, 4)  # Real tokens per text; the rest are pads.
SCALE = 7.0
LOSS_RTOL = 1e-5
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- helpers


def _f32(x):
  """Rounds to float32 and returns float64, so both sides see identical inputs."""
  return np.asarray(x, np.float32).astype(np.float64)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax_row(row):
  m = max(row)
  lse = m + math.log(sum(math.exp(v - m) for v in row))
  return [v - lse for v in row]


def tokens(seed=0, bi=B, bt=B, n=N, lengths=LENGTHS, length=L, ties=True):
  """(image tokens, text tokens, mask): unit tokens, random (non-zero) pads, and
  with `ties` duplicated tokens in an image and in a text."""
  rng = np.random.default_rng(seed)
  img = _unit(rng.normal(size=(bi, n, D)))
  txt = _unit(rng.normal(size=(bt, length, D)))
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:bt, None]
  if ties:
    img[1, 2] = img[1, 0]
    txt[2, 1] = txt[2, 0]  # Both real (text 2 has 2 real tokens).
  return _f32(img), _f32(txt), mask


# ------------------------------------------------------------------- NumPy reference


def ref_scores(img, txt, mask):
  """(s^I, s^T) [Bi, Bt] by the paper's definitions, one pair and token at a time."""
  bi, bt = len(img), len(txt)
  s_i, s_t = np.zeros((bi, bt)), np.zeros((bi, bt))
  for i in range(bi):
    for j in range(bt):
      real = [r for r in range(txt.shape[1]) if mask[j][r]]
      sim = (img[i] @ txt[j].T).tolist()  # sim[k][r] = <x_ik, y_jr>
      s_i[i, j] = sum(max(sim[k][r] for r in real) for k in range(len(sim))) / len(sim)
      s_t[i, j] = sum(max(sim[k][r] for k in range(len(sim))) for r in real) / len(real)
  return s_i, s_t


def ref_filip(img, txt, mask, scale, ls=0.0):
  """1/2 (mean_i CE(t s^I_i., i) + mean_j CE(t s^T_.j, j)), smoothed targets."""
  s_i, s_t = ref_scores(img, txt, mask)
  b = len(img)
  total = 0.0
  for direction in range(2):
    for a in range(b):
      row = [scale * (s_i[a][c] if direction == 0 else s_t[c][a]) for c in range(b)]
      logp = _log_softmax_row(row)
      for c in range(b):
        target = (1.0 - ls) * (1.0 if a == c else 0.0) + ls / b
        total -= target * logp[c]
  return 0.5 * total / b


@functools.cache
def _objective(name, **cfg):
  """The registered objective `name` with options `cfg`, jitted once."""
  return jax.jit(lambda outputs: OBJECTIVES.get(name)(outputs, {}, cfg))


# ------------------------------------------------------------------------ similarities


@functools.partial(jax.jit, static_argnames=("block", "image_block"))
def _scores(img, txt, mask, block=64, image_block=None):
  return filip.token_similarities(img, txt, mask, block=block, image_block=image_block)


def test_scores_match_reference_with_padding_ties_and_lengths():
  img, txt, mask = tokens(bi=3)  # Bi != Bt.
  s_i, s_t = _scores(img, txt, mask)
  assert s_i.dtype == s_t.dtype == jnp.float32 and s_i.shape == (3, B)
  ref_i, ref_t = ref_scores(img, txt, mask)
  np.testing.assert_allclose(s_i, ref_i, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_t, ref_t, rtol=1e-5, atol=1e-6)
  # The two directions are different matrices, not transposes of each other.
  assert np.max(np.abs(np.asarray(s_i) - np.asarray(s_t))) > 1e-2
  # A 0/1 float mask is the same as a bool one.
  s_i2, s_t2 = _scores(img, txt, mask.astype(np.float32))
  np.testing.assert_array_equal(s_i2, s_i)
  np.testing.assert_array_equal(s_t2, s_t)


def test_s_i_is_not_the_transpose_of_s_t():
  img, txt, mask = tokens(seed=3, ties=False)
  s_i, s_t = _scores(img, txt, mask)
  assert np.max(np.abs(np.asarray(s_i) - np.asarray(s_t).T)) > 1e-2


def test_padding_invariance():
  """Extra pad tokens (of any value) change neither s^I nor s^T."""
  img, txt, mask = tokens(seed=1)
  rng = np.random.default_rng(9)
  extra = _f32(_unit(rng.normal(size=(B, 3, D))))
  txt2 = np.concatenate([txt, extra], axis=1)
  mask2 = np.concatenate([mask, np.zeros((B, 3), bool)], axis=1)
  # Different values in the existing pad slots, too.
  txt2[~mask2] = _f32(_unit(rng.normal(size=(int((~mask2).sum()), D))))
  for a, b in zip(_scores(img, txt, mask), _scores(img, txt2, mask2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pads_are_excluded_from_the_max_not_zeroed():
  """All real similarities negative and zero-vector pads: a zeroed pad (similarity 0)
  would win the image->text max; -inf masking keeps the real (negative) one."""
  e = np.eye(D)
  img = _f32(np.tile(e[0], (1, N, 1)))
  txt = np.zeros((1, L, D))
  txt[0, :2] = _unit(np.array([[-1.0, 1.0, 0, 0], [-1.0, 0, 1.0, 0]]))
  mask = np.arange(L)[None] < 2
  s_i, s_t = _scores(img, _f32(txt), mask)
  ref_i, ref_t = ref_scores(img, _f32(txt), mask)
  assert ref_i[0, 0] < -0.5
  np.testing.assert_allclose(s_i, ref_i, rtol=1e-6)
  np.testing.assert_allclose(s_t, ref_t, rtol=1e-6)


def test_text_without_real_tokens_scores_zero_and_stays_finite():
  img, txt, mask = tokens(seed=2)
  mask = mask.copy()
  mask[1] = False
  s_i, s_t = _scores(img, txt, mask)
  assert np.all(np.asarray(s_i)[:, 1] == 0) and np.all(np.asarray(s_t)[:, 1] == 0)
  loss, grads = _loss_and_grads(img, txt, mask, SCALE, 0.0)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_bfloat16_tokens_give_float32_scores():
  img, txt, mask = tokens(seed=4)
  ref = _scores(img, txt, mask)
  low = _scores(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), mask)
  for a, b in zip(low, ref):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=2e-2)


CHUNKS = ((1, None), (3, 2), (4, None), (7, 1))  # (block, image_block); Bi=5, Bt=7.


@functools.cache
def _chunked_fn():
  """Value and gradient of a random weighting of both score matrices, for each of
  CHUNKS and unchunked, in one compiled function."""
  w = np.random.default_rng(0).normal(size=(2, 5, 7))
  mask = tokens(seed=5, bi=5, bt=7, lengths=(5, 1, 3, 2, 4, 5, 2))[2]

  def f(img, txt, block, image_block):
    s_i, s_t = filip.token_similarities(img, txt, mask, block=block,
                                        image_block=image_block)
    return jnp.sum(w[0] * s_i + w[1] * s_t), (s_i, s_t)

  vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  return jax.jit(lambda img, txt: [vg(img, txt, *c) for c in ((64, None),) + CHUNKS])


def test_chunked_equals_unchunked():
  """Chunks over texts (and images), dividing or not, give the same scores and
  gradients as one block."""
  img, txt, _ = tokens(seed=5, bi=5, bt=7, lengths=(5, 1, 3, 2, 4, 5, 2))
  ((rv, rscores), rgrads), *chunked = _chunked_fn()(img, txt)
  for c, ((v, scores), grads) in zip(CHUNKS, chunked):
    np.testing.assert_allclose(v, rv, rtol=1e-6, err_msg=str(c))
    for a, b in zip(scores + grads, rscores + rgrads):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=str(c))


# ------------------------------------------------------------------------------- loss


@jax.jit
def _loss_and_grads(img, txt, mask, scale, ls):
  def loss(x, y, s):
    return filip.filip_loss_from_tokens(x, y, mask, s, label_smoothing=ls, block=3)[0]

  return jax.value_and_grad(loss, argnums=(0, 1, 2))(img, txt, jnp.float32(scale))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_loss_and_gradients_match_reference(ls):
  """Loss and gradients (image tokens, text tokens, scale) against finite differences
  of the float64 reference, with pads, ties and texts of different lengths."""
  img, txt, mask = tokens()
  # The duplicated tokens tie in some maxima (argmax picks the first of the pair).
  assert any(0 in np.argmax(img[1] @ txt[j][mask[j]].T, axis=0) for j in range(B))
  assert any(0 in np.argmax(img[i] @ txt[2][mask[2]].T, axis=1) for i in range(B))
  loss, grads = _loss_and_grads(img, txt, mask, SCALE, ls)
  assert float(loss) == pytest.approx(ref_filip(img, txt, mask, SCALE, ls),
                                      rel=LOSS_RTOL)
  g_img = _num_grad(lambda x: ref_filip(x, txt, mask, SCALE, ls), img)
  g_txt = _num_grad(lambda x: ref_filip(img, x, mask, SCALE, ls), txt)
  g_scale = _num_grad(lambda x: ref_filip(img, txt, mask, float(x), ls),
                      np.float64(SCALE))
  np.testing.assert_allclose(grads[0], g_img, **GRAD_TOL)
  np.testing.assert_allclose(grads[1], g_txt, **GRAD_TOL)
  np.testing.assert_allclose(grads[2], g_scale, **GRAD_TOL)
  # Pads get no gradient.
  assert np.all(np.asarray(grads[1])[~mask] == 0)


def test_one_token_each_is_clip():
  """n1 = n2 = 1: s^I = s^T = the cosine, so FILIP is CLIP (value and accuracies)."""
  rng = np.random.default_rng(6)
  img = _unit(rng.normal(size=(6, D))).astype(np.float32)
  txt = _unit(img + rng.normal(size=(6, D))).astype(np.float32)
  outputs = {"image_token_emb": img[:, None], "text_token_emb": txt[:, None],
             "text_token_mask": np.ones((6, 1), np.int32), "logit_scale": SCALE}
  clip_outputs = {"image_emb": img, "text_emb": txt, "logit_scale": SCALE}

  @jax.jit
  def both(outputs, clip_outputs):
    return [(OBJECTIVES.get("filip")(outputs, {}, {"label_smoothing": ls}),
             OBJECTIVES.get("clip")(clip_outputs, {}, {"label_smoothing": ls}))
            for ls in (0.0, 0.1)]

  for (loss, metrics), (ref, ref_m) in both(outputs, clip_outputs):
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    for k in ("i2t_acc", "t2i_acc"):
      assert float(metrics[k]) == float(ref_m[k])
    assert 0.0 < float(ref_m["i2t_acc"]) < 1.0


def test_objective_registration_metrics_and_options():
  info = OBJECTIVES.info("filip")
  assert info["reads"] == ("image_token_emb", "text_token_emb", "text_token_mask",
                           "logit_scale")
  assert info["batch_global"]
  img, txt, mask = tokens(ties=False)
  outputs = {"image_token_emb": img, "text_token_emb": txt,
             "text_token_mask": mask.astype(np.float32), "logit_scale": SCALE}
  loss, metrics = _objective("filip", block=2)(outputs)
  assert set(metrics) == {"loss", "i2t_acc", "t2i_acc", "logit_scale"}
  assert float(loss) == pytest.approx(ref_filip(img, txt, mask, SCALE), rel=LOSS_RTOL)
  s_i, s_t = ref_scores(img, txt, mask)
  assert float(metrics["i2t_acc"]) == np.mean(np.argmax(s_i, 1) == np.arange(B))
  assert float(metrics["t2i_acc"]) == np.mean(np.argmax(s_t, 0) == np.arange(B))
  with pytest.raises(ValueError, match=r"token_fraction: the paper's top-k token "
                                       r"exchange is not implemented"):
    OBJECTIVES.get("filip")(outputs, {}, {"token_fraction": 0.25})
  with pytest.raises(ValueError, match=r"distributed='ring'.*'auto'"):
    OBJECTIVES.get("filip")(outputs, {}, {"distributed": "ring"})
  with pytest.raises(ValueError, match=r"text_mask \(4, 4\) must be \[Bt, L\]"):
    filip.token_similarities(img, txt, mask[:, :4])


def test_macs():
  assert filip.filip_similarity_macs(8, 196, 77, 256) == 8 * 196 * 77 * 256
  config = test_train.tiny_config()
  n = macs.image_tokens(config.model, config.data.image_size, True)
  assert filip.filip_logits_macs(config) == (
      config.batch_size * n * config.model.text.context_length * config.model.embed_dim)
  config.model.token_embed_dim = 8
  assert filip.filip_logits_macs(config) == (
      config.batch_size * n * config.model.text.context_length * 8)


# ------------------------------------------------------------------------ accumulation


class TinyTokenModel(nn.Module):
  """Stands in for a FILIP model: per-token projections, L2-normalised, pad id 0."""

  @nn.compact
  def __call__(self, batch, train=True):
    del train
    img = nn.Dense(D, name="img")(batch["image"])             # [B, N, D]
    txt = nn.Embed(11, D, name="txt")(batch["text"])          # [B, L, D]
    scale = self.param("logit_scale", lambda _: jnp.log(jnp.float32(SCALE)))
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return {"image_token_emb": norm(img), "text_token_emb": norm(txt),
            "text_token_mask": (batch["text"] != 0).astype(jnp.float32),
            "logit_scale": jnp.exp(scale)}


def test_accumulation_equals_full_batch():
  """accum_steps=4 (every negative kept through the cache) gives the full-batch
  gradient and metrics, logit_scale included."""
  rng = np.random.default_rng(7)
  lengths = np.arange(8)[:, None] % L + 1
  text = rng.integers(1, 11, size=(8, L)) * (np.arange(L)[None] < lengths)
  text[:, 0] = np.arange(1, 9)  # No two texts alike: no tied accuracies.
  batch = {"image": jnp.asarray(rng.normal(size=(8, N, 6)), jnp.float32),
           "text": jnp.asarray(text, jnp.int32)}
  model = TinyTokenModel()
  params = {"img": {"kernel": jnp.asarray(rng.normal(size=(6, D)), jnp.float32),
                    "bias": jnp.zeros((D,), jnp.float32)},
            "txt": {"embedding": jnp.asarray(rng.normal(size=(11, D)), jnp.float32)},
            "logit_scale": jnp.log(jnp.float32(SCALE))}
  objectives = [combine.from_registry("filip", 1.0)]

  def grads(k):
    fn = jax.jit(lambda p, b: step_lib.gradients(p, model, objectives, b,
                                                 jax.random.PRNGKey(1), k))
    return jax.device_get(fn(params, batch))

  ref_g, ref_m = grads(1)
  g, m = grads(4)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, g, ref_g)
  assert abs(float(ref_g["logit_scale"])) > 1e-4
  assert {"loss", "filip/loss", "filip/i2t_acc", "filip/t2i_acc"} <= set(ref_m)
  jax.tree.map(close, m, ref_m)
