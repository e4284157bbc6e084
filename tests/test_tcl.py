"""TCL's contrastive objective (vlp_jax/objectives/tcl.py) against a plain NumPy loop
transcription of the official code (uta-smile/TCL, models/model_pretrain.py):
values, gradients (central differences of the reference, float64) and properties."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import errors
from vlp_jax.objectives import tcl
from vlp_jax.registry import OBJECTIVES

G, Q, D = 4, 8, 6  # Global batch, queue rows, embedding width.
GRID = 4  # 4 x 4 patches -> 2 x 2 pooled locals (TCL at 256 px / 16: 16 x 16 -> 4 x 4).
T = 7  # Text positions (position 0 = the global's; locals are 1:).
SCALE = 5.0


# ---------------------------------------------------------------- NumPy reference.
def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(row):
  m = max(row)
  lse = m + math.log(sum(math.exp(r - m) for r in row))
  return [r - lse for r in row]


def _softmax(row):
  return [math.exp(r) for r in _log_softmax(row)]


def ref_patch_pooling(x):
  """`patch_pooling`: [B, b*b, D] -> [B, c*c, D], c = int(sqrt(b)), loops."""
  bsz, n, d = x.shape
  b = int(np.sqrt(n))
  c = int(np.sqrt(b))
  out = np.zeros((bsz, c * c, d))
  for i in range(bsz):
    for r in range(c):
      for s in range(c):
        acc = np.zeros(d)
        for dr in range(c):
          for ds in range(c):
            acc += x[i, (r * c + dr) * b + (s * c + ds)]
        out[i, r * c + s] = acc / (c * c)
  return out


def ref_soft_ce(online, candidates, scale, targets):
  """mean_i -sum_c targets[i][c] log_softmax_c(online_i . cand_c / temp)."""
  total = 0.0
  for i in range(len(online)):
    logits = [scale * float(np.dot(online[i], cand)) for cand in candidates]
    lsm = _log_softmax(logits)
    total += -sum(t * l for t, l in zip(targets[i], lsm))
  return total / len(online)


def ref_in_batch_g2l(l, m, scale, attention_mask=None):
  """`in_batch_g2l_loss` with its +-1e4 masking, one anchor at a time."""
  n, n_locals, _ = l.shape
  total = 0.0
  for i in range(n):
    sample = 0.0
    for k in range(n_locals):
      valid_k = attention_mask is None or attention_mask[i][k] > 0
      u_p = scale * float(np.dot(l[i, k], m[i])) if valid_k else 1e4
      negs = []
      for j in range(n):
        for kk in range(n_locals):
          u = scale * float(np.dot(m[i], l[j, kk]))
          if j == i:
            u = -1e4
          if attention_mask is not None and attention_mask[j][kk] == 0:
            u = -1e4
          negs.append(u)
      sample += -_log_softmax([u_p] + negs)[0]
    if attention_mask is None:
      total += sample / n_locals
    else:
      total += sample / sum(attention_mask[i])
  return total / n


def reference(inp, alpha, scale, target_scale=None):
  """The six terms of TCL's loss_ita. `target_scale` (default `scale`) is the
  temperature inside the no-grad distillation targets (held fixed when
  differentiating with respect to `scale`)."""
  target_scale = scale if target_scale is None else target_scale
  u, v = inp["image_emb"], inp["text_emb"]
  um, vm = inp["teacher_view_emb/aug"][:, 0], inp["teacher_text_emb"]
  image_all = list(um) + list(inp["queue/image"])
  text_all = list(vm) + list(inp["queue/text"])
  n_all = len(image_all)
  onehot = [[1.0 if c == i else 0.0 for c in range(n_all)] for i in range(G)]

  def distill(teacher, cands):
    out = []
    for i in range(G):
      sm = _softmax([target_scale * float(np.dot(teacher[i], c)) for c in cands])
      out.append([alpha * p + (1 - alpha) * h for p, h in zip(sm, onehot[i])])
    return out

  img_locals = ref_patch_pooling(_unit(inp["teacher_view_local_emb/aug"][:, 0]))
  txt_locals = _unit(inp["teacher_text_local_emb"][:, 1:])
  mask = inp["teacher_text_local_mask"][:, 1:]
  return {
      "cma_i2t": ref_soft_ce(u, text_all, scale, distill(um, text_all)),
      "cma_t2i": ref_soft_ce(v, image_all, scale, distill(vm, image_all)),
      "imc_i2i": ref_soft_ce(u, image_all, scale, onehot),
      "imc_t2t": ref_soft_ce(v, text_all, scale, onehot),
      "lmi_image": ref_in_batch_g2l(img_locals, u, scale),
      "lmi_text": ref_in_batch_g2l(txt_locals, v, scale, mask),
  }


def ref_loss(inp, alpha, scale, target_scale=None):
  return sum(reference(inp, alpha, scale, target_scale).values()) / 6


# ---------------------------------------------------------------- Inputs.
def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((G, T))
  for i, length in enumerate([7, 3, 5, 2]):  # Real tokens incl. position 0.
    mask[i, :length] = 1.0
  return {
      "image_emb": _unit(rng.normal(size=(G, D))),
      "text_emb": _unit(rng.normal(size=(G, D))),
      "teacher_view_emb/aug": _unit(rng.normal(size=(G, 1, D))),
      "teacher_text_emb": _unit(rng.normal(size=(G, D))),
      "teacher_view_local_emb/aug": rng.normal(size=(G, 1, GRID * GRID, D)),
      "teacher_text_local_emb": rng.normal(size=(G, T, D)),
      "teacher_text_local_mask": mask,
      "queue/image": _unit(rng.normal(size=(Q, D))),
      "queue/text": _unit(rng.normal(size=(Q, D))),
      "logit_scale": np.float64(SCALE),
  }


def to_jax(inp):
  return {k: jnp.asarray(v, jnp.float32) for k, v in inp.items()}


@pytest.fixture(scope="module")
def inputs():
  return make_inputs()


@pytest.fixture(scope="module")
def terms_fn():
  return jax.jit(lambda o, a: tcl.tcl_terms(o, a, 2.0))


@functools.lru_cache(maxsize=None)
def objective(cfg_items=()):
  """The registered objective, jitted over (outputs, step) for options `cfg_items`."""
  fn = OBJECTIVES.get("tcl")
  return jax.jit(lambda o, step: fn(o, {"step": step}, dict(cfg_items)))


@pytest.fixture(scope="module")
def loss_grad_fn():
  fn = OBJECTIVES.get("tcl")

  def loss(outputs, step, cfg):
    return fn(outputs, {"step": step}, cfg)[0]
  return jax.jit(jax.grad(loss), static_argnums=2)


# ---------------------------------------------------------------- Values.
@pytest.mark.parametrize("alpha", [0.4, 0.0, 1.0])
def test_every_term_matches_the_reference(inputs, terms_fn, alpha):
  got = terms_fn(to_jax(inputs), jnp.float32(alpha))
  want = reference(inputs, alpha, SCALE)
  for name in tcl.TERMS:
    np.testing.assert_allclose(float(got[name]), want[name], rtol=2e-5, atol=1e-5,
                               err_msg=name)
  assert len(set(round(w, 4) for w in want.values())) == 6  # The terms differ.


def test_loss_is_the_mean_of_the_six_terms_and_metrics(inputs):
  loss, metrics = objective()(to_jax(inputs), jnp.int32(3))
  assert set(tcl.TERMS) <= set(metrics) and {"alpha", "loss", "logit_scale"} <= set(
      metrics)
  assert float(loss) == pytest.approx(sum(float(metrics[t]) for t in tcl.TERMS) / 6,
                                      rel=1e-6)
  assert float(loss) == pytest.approx(ref_loss(inputs, 0.4, SCALE), rel=2e-5)
  assert float(metrics["alpha"]) == pytest.approx(0.4)


def test_alpha_ramps_linearly_over_the_warmup():
  cfg = {"alpha": 0.4, "alpha_warmup_steps": 10}
  for step, want in [(0, 0.0), (5, 0.2), (10, 0.4), (1000, 0.4)]:
    a = tcl.alpha_at(jnp.int32(step), cfg["alpha"], cfg["alpha_warmup_steps"])
    assert float(a) == pytest.approx(want)
  inp = to_jax(make_inputs())
  _, m0 = objective(tuple(cfg.items()))(inp, jnp.int32(0))
  _, m5 = objective(tuple(cfg.items()))(inp, jnp.int32(5))
  assert float(m0["alpha"]) == 0.0 and float(m5["alpha"]) == pytest.approx(0.2)
  assert float(m0["cma_i2t"]) != pytest.approx(float(m5["cma_i2t"]), rel=1e-4)


def test_alpha_zero_gives_one_hot_cma(inputs, terms_fn):
  got = terms_fn(to_jax(inputs), jnp.float32(0.0))
  u, v = inputs["image_emb"], inputs["text_emb"]
  texts = np.concatenate([inputs["teacher_text_emb"], inputs["queue/text"]])
  images = np.concatenate([inputs["teacher_view_emb/aug"][:, 0], inputs["queue/image"]])
  onehot = np.eye(G, G + Q)
  np.testing.assert_allclose(float(got["cma_i2t"]),
                             ref_soft_ce(u, texts, SCALE, onehot), rtol=2e-5)
  np.testing.assert_allclose(float(got["cma_t2i"]),
                             ref_soft_ce(v, images, SCALE, onehot), rtol=2e-5)


def test_the_logit_scale_is_clamped_below(inputs, terms_fn):
  low = dict(to_jax(inputs), logit_scale=jnp.float32(0.5))
  got = terms_fn(low, jnp.float32(0.4))  # min_logit_scale=2.0.
  want = reference(inputs, 0.4, 2.0)
  assert float(got["logit_scale"]) == 2.0
  np.testing.assert_allclose(float(got["imc_i2i"]), want["imc_i2i"], rtol=2e-5)
  # Straight-through: below the bound the scale still gets the clamped value's
  # gradient, so training can bring it back (TCL clamps the parameter in place).
  grad = jax.grad(lambda s: terms_fn(dict(low, logit_scale=s), jnp.float32(0.4))[
      "imc_i2i"])(jnp.float32(0.5))
  at_bound = jax.grad(lambda s: terms_fn(dict(low, logit_scale=s), jnp.float32(0.4))[
      "imc_i2i"])(jnp.float32(2.0))
  assert float(grad) != 0.0
  np.testing.assert_allclose(float(grad), float(at_bound), rtol=1e-5)


# ---------------------------------------------------------------- Gradients.
def _central_diff(f, x, eps=1e-6):
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    g[idx] = (f(hi) - f(lo)) / (2 * eps)
  return g


def test_gradients_match_the_reference(inputs, loss_grad_fn):
  alpha = 0.4
  grads = loss_grad_fn(to_jax(inputs), jnp.int32(0), ())
  for name in ("image_emb", "text_emb"):
    want = _central_diff(
        lambda x, name=name: ref_loss(dict(inputs, **{name: x}), alpha, SCALE),
        inputs[name])
    np.testing.assert_allclose(np.asarray(grads[name]), want, rtol=2e-3, atol=2e-5,
                               err_msg=name)
  # The temperature's gradient flows through the online logits only (the official
  # targets are computed under no_grad).
  want = _central_diff(lambda s: ref_loss(inputs, alpha, float(s), SCALE),
                       np.float64(SCALE))
  np.testing.assert_allclose(float(grads["logit_scale"]), float(want), rtol=2e-3,
                             atol=1e-6)


def test_teacher_outputs_and_queues_get_no_gradient(inputs, loss_grad_fn):
  grads = loss_grad_fn(to_jax(inputs), jnp.int32(0), ())
  for name in inputs:
    if name.startswith(("teacher_", "queue/")):
      assert not np.any(np.asarray(grads[name])), name
  assert np.any(np.asarray(grads["image_emb"])) and np.any(np.asarray(grads["text_emb"]))


# ---------------------------------------------------------------- Properties.
def test_lmi_ignores_padded_text_positions(inputs, terms_fn):
  changed = {k: np.array(v) for k, v in inputs.items()}
  mask = inputs["teacher_text_local_mask"]
  noise = np.random.default_rng(1).normal(size=changed["teacher_text_local_emb"].shape)
  changed["teacher_text_local_emb"] += 10.0 * noise * (1 - mask)[..., None]
  assert not np.allclose(changed["teacher_text_local_emb"],
                         inputs["teacher_text_local_emb"])
  a = terms_fn(to_jax(inputs), jnp.float32(0.4))
  b = terms_fn(to_jax(changed), jnp.float32(0.4))
  for name in tcl.TERMS:
    assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-6), name


def test_lmi_does_not_use_the_queue(inputs, terms_fn):
  changed = dict(inputs, **{"queue/image": -inputs["queue/image"][::-1],
                            "queue/text": -inputs["queue/text"][::-1]})
  a = terms_fn(to_jax(inputs), jnp.float32(0.4))
  b = terms_fn(to_jax(changed), jnp.float32(0.4))
  for name in ("lmi_image", "lmi_text"):
    assert float(a[name]) == float(b[name]), name
  for name in ("cma_i2t", "cma_t2i", "imc_i2i", "imc_t2t"):
    assert float(a[name]) != pytest.approx(float(b[name]), rel=1e-5), name


def test_lmi_uses_the_teacher_locals_not_the_online_ones(inputs, terms_fn):
  """The locals are the teacher's: changing them changes LMI (only)."""
  changed = dict(inputs)
  changed["teacher_view_local_emb/aug"] = inputs["teacher_view_local_emb/aug"][::-1]
  a = terms_fn(to_jax(inputs), jnp.float32(0.4))
  b = terms_fn(to_jax(changed), jnp.float32(0.4))
  assert float(a["lmi_image"]) != pytest.approx(float(b["lmi_image"]), rel=1e-5)
  assert float(a["imc_i2i"]) == float(b["imc_i2i"])


@pytest.mark.parametrize("n", [81, 256])  # 9 x 9 -> 3 x 3; 16 x 16 (TCL) -> 4 x 4.
def test_patch_pooling_matches_the_official_loop(n):
  x = np.random.default_rng(2).normal(size=(2, n, 3))
  np.testing.assert_allclose(np.asarray(tcl.pool_patches(jnp.asarray(x))),
                             ref_patch_pooling(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [196, 576, 15])  # 14 x 14 (224 px), 24 x 24, not a grid.
def test_a_grid_side_that_is_not_a_square_is_a_clear_error(n):
  with pytest.raises(errors.ConfigError, match=r"perfect square.*image_size"):
    tcl.pool_patches(jnp.zeros((2, n, 3)))


def test_more_than_one_momentum_view_is_a_clear_error(inputs):
  two = dict(to_jax(inputs))
  two["teacher_view_emb/aug"] = jnp.concatenate([two["teacher_view_emb/aug"]] * 2, 1)
  with pytest.raises(errors.ConfigError, match=r"views\.aug\.count=1"):
    tcl.tcl_terms(two, 0.4)


def test_registration_and_options():
  info = OBJECTIVES.info("tcl")
  assert info["batch_global"] and tuple(info["batch_keys"]) == ("step",)
  assert set(info["reads"]) == set(tcl.READS)
  assert {"queue/image", "queue/text", "teacher_view_local_emb/aug"} <= set(
      info["reads"])
  assert tcl.check_tcl_options({}) == tcl.TCL_OPTIONS
  with pytest.raises(ValueError, match="Did you mean 'alpha'"):
    tcl.check_tcl_options({"alpah": 0.4})
  with pytest.raises(ValueError, match=r"alpha=1.5 must be in \[0, 1\]"):
    tcl.check_tcl_options({"alpha": 1.5})
  with pytest.raises(ValueError, match="alpha_warmup_steps"):
    tcl.check_tcl_options({"alpha_warmup_steps": -1})
