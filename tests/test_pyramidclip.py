"""PyramidCLIP (vlp_jax/objectives/pyramidclip.py) against a plain NumPy loop
written from the equations in its docstring: loss, gradients (embeddings and the
logit scale), reductions, config errors, and the recipe's two steps on shapes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import cli, errors, validation
from vlp_jax.objectives import pyramidclip
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import loop, metric_writer

LOCAL, SHORT = "view_emb/local", "text_view_emb/short"


# --- The reference: loops over rows and columns, gradients derived by hand. ---

def _log_softmax(row):
  m = max(row)
  lse = m + np.log(sum(np.exp(x - m) for x in row))
  return [x - lse for x in row]


def ref_term(v, t, s, alpha):
  """L(V, T) and its gradients (dV, dT, ds) by loops.

  z_ij = s v_i . t_j; q_ii = 1 - alpha, q_ij = alpha / (N - 1);
  L = 1/2 [ -1/N sum_i sum_j q_ij log softmax_j(z_i.)
            -1/N sum_j sum_i q_ji log softmax_i(z_.j) ],
  dL/dz_ij = 1/2 [ (p_ij - q_ij) + (p'_ji - q_ji) ] / N  (p: row softmax of z,
  p': row softmax of z^T), dz_ij/dv_i = s t_j, dz_ij/dt_j = s v_i, dz_ij/ds = v_i.t_j.
  """
  n = len(v)
  q = [[1.0 - alpha if i == j else alpha / (n - 1) for j in range(n)]
       for i in range(n)]
  dots = [[float(np.dot(v[i], t[j])) for j in range(n)] for i in range(n)]
  z = [[s * dots[i][j] for j in range(n)] for i in range(n)]
  loss, dz = 0.0, [[0.0] * n for _ in range(n)]
  for i in range(n):  # image -> text: row i over the texts j.
    logp = _log_softmax(z[i])
    for j in range(n):
      loss -= 0.5 / n * q[i][j] * logp[j]
      dz[i][j] += 0.5 / n * (np.exp(logp[j]) - q[i][j])
  for j in range(n):  # text -> image: text j over the images i.
    logp = _log_softmax([z[i][j] for i in range(n)])
    for i in range(n):
      loss -= 0.5 / n * q[j][i] * logp[i]
      dz[i][j] += 0.5 / n * (np.exp(logp[i]) - q[j][i])
  dv, dt, ds = np.zeros_like(v), np.zeros_like(t), 0.0
  for i in range(n):
    for j in range(n):
      dv[i] += dz[i][j] * s * t[j]
      dt[j] += dz[i][j] * s * v[i]
      ds += dz[i][j] * dots[i][j]
  return loss, dv, dt, ds


def ref_pyramidclip(out, alpha, peer_weight=1.0, cross_weight=1.0):
  """Total loss and gradients wrt every read output (local terms: mean over crops)."""
  s = float(out["logit_scale"])
  g = np.asarray(out["image_emb"], np.float64)
  full = np.asarray(out["text_emb"], np.float64)
  loc, short = np.asarray(out[LOCAL], np.float64), np.asarray(out[SHORT], np.float64)
  k = loc.shape[1]
  grads = {"image_emb": np.zeros_like(g), "text_emb": np.zeros_like(full),
           LOCAL: np.zeros_like(loc), SHORT: np.zeros_like(short), "logit_scale": 0.0}
  total = 0.0
  terms = [(peer_weight, "image_emb", SHORT), (peer_weight, LOCAL, "text_emb"),
           (cross_weight, "image_emb", "text_emb"), (cross_weight, LOCAL, SHORT)]
  arrays = {"image_emb": g, "text_emb": full, SHORT: short}
  for w, vkey, tkey in terms:
    crops = [(None, g)] if vkey == "image_emb" else [(c, loc[:, c]) for c in range(k)]
    for c, v in crops:
      loss, dv, dt, ds = ref_term(v, arrays[tkey], s, alpha)
      f = w / len(crops)
      total += f * loss
      if c is None:
        grads[vkey] += f * dv
      else:
        grads[LOCAL][:, c] += f * dv
      grads[tkey] += f * dt
      grads["logit_scale"] += f * ds
  return total, grads


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def outputs(b=6, d=5, k=1, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(b, d))
  return {"image_emb": _unit(base + 0.8 * rng.normal(size=(b, d))),
          "text_emb": _unit(base + 0.8 * rng.normal(size=(b, d))),
          LOCAL: _unit(base[:, None] + 0.8 * rng.normal(size=(b, k, d))),
          SHORT: _unit(base + 0.8 * rng.normal(size=(b, d))),
          "logit_scale": np.float32(7.0)}


@functools.cache
def _grad_fn(options):
  fn = OBJECTIVES.get("pyramidclip")
  return jax.jit(jax.value_and_grad(lambda o: fn(o, {}, dict(options)), has_aux=True))


def run(out, **options):
  (loss, metrics), grads = _grad_fn(tuple(sorted(options.items())))(out)
  return float(loss), jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.parametrize("k,options", [
    (1, {}),  # The defaults: alpha 0.2, equal weights.
    (2, {"negative_smoothing": 0.35, "peer_weight": 0.5, "cross_weight": 2.0}),
    (1, {"negative_smoothing": 0.0}),
])
def test_loss_and_gradients_match_the_loop(k, options):
  out = outputs(k=k, seed=k)
  alpha = options.get("negative_smoothing", 0.2)
  ref_loss, ref_grads = ref_pyramidclip(out, alpha, options.get("peer_weight", 1.0),
                                        options.get("cross_weight", 1.0))
  loss, metrics, grads = run(out, **options)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert metrics["loss"] == pytest.approx(loss)
  for key, want in ref_grads.items():
    np.testing.assert_allclose(grads[key], want, rtol=1e-4, atol=1e-6, err_msg=key)
  # The parts: loss = w_peer * peer + w_cross * cross, each the sum of its two terms.
  assert metrics["peer_loss"] == pytest.approx(
      metrics["global_short_loss"] + metrics["local_full_loss"], rel=1e-6)
  assert metrics["cross_loss"] == pytest.approx(
      metrics["global_full_loss"] + metrics["local_short_loss"], rel=1e-6)
  assert loss == pytest.approx(options.get("peer_weight", 1.0) * metrics["peer_loss"] +
                               options.get("cross_weight", 1.0) * metrics["cross_loss"],
                               rel=1e-6)
  # global_full is plain CLIP's pair: its term is the loop's L(global, full).
  want = ref_term(out["image_emb"], out["text_emb"], 7.0, alpha)[0]
  assert metrics["global_full_loss"] == pytest.approx(want, rel=1e-5)


def test_softening_changes_the_loss_and_the_gradient():
  out = outputs()
  hard, _, g_hard = run(out, negative_smoothing=0.0)
  soft, _, g_soft = run(out, negative_smoothing=0.2)
  assert abs(hard - soft) > 1e-3
  assert not np.allclose(g_hard["image_emb"], g_soft["image_emb"], atol=1e-4)


def test_identical_views_without_softening_are_clip_times_the_terms():
  out = outputs()
  out[LOCAL], out[SHORT] = out["image_emb"][:, None], out["text_emb"]
  clip_loss, clip_metrics = OBJECTIVES.get("clip")(out, {}, {})
  loss, metrics, _ = run(out, negative_smoothing=0.0)
  assert loss == pytest.approx(4 * float(clip_loss), rel=1e-6)
  assert metrics["i2t_acc"] == pytest.approx(float(clip_metrics["i2t_acc"]))
  loss, _, _ = run(out, negative_smoothing=0.0, peer_weight=0.5, cross_weight=2.0)
  assert loss == pytest.approx(2 * (0.5 + 2.0) * float(clip_loss), rel=1e-6)
  # With softening each term is CLIP's `negative_smoothing` loss.
  soft_clip, _ = OBJECTIVES.get("clip")(out, {}, {"negative_smoothing": 0.2})
  loss, _, _ = run(out)
  assert loss == pytest.approx(4 * float(soft_clip), rel=1e-6)


def test_option_errors():
  check = OBJECTIVES.info("pyramidclip")["check"]
  assert check({}) == pyramidclip.PYRAMIDCLIP_OPTIONS
  cases = [({"negative_smooth": 0.1}, r"Did you mean 'negative_smoothing'"),
           ({"negative_smoothing": 1.0}, r"negative_smoothing=1.0 must be in \[0, 1\)"),
           ({"peer_weight": -1.0}, r"peer_weight=-1.0 must be a number >= 0"),
           ({"peer_weight": 0.0, "cross_weight": 0}, r"both 0"),
           ({"distributed": "ring"}, r"use 'auto' or 'dense'")]
  for options, match in cases:
    with pytest.raises(ValueError, match=match):
      check(options)


@functools.cache
def _recipe(arg=":runlocal"):
  return cli.load_config_file("configs/pyramidclip_b16.py" + arg)


def test_missing_views_are_clear_config_errors():
  c = _recipe()
  validation.validate(c)
  c = cli.load_config_file("configs/pyramidclip_b16.py:runlocal")
  c.data.views = {}
  with pytest.raises(errors.ConfigError,
                     match=r"'view_emb/local'.*view group 'local' in config\.data\."
                     r"views.*--config\.data\.views\.local\.count=1"):
    validation.validate(c)
  c = cli.load_config_file("configs/pyramidclip_b16.py:runlocal")
  c.data.text_views = {"summary": {"kind": "first_words", "words": 3}}
  with pytest.raises(errors.ConfigError,
                     match=r"'text_view_emb/short'.*view group 'short' in "
                     r"config\.data\.text_views \(configured: \['summary'\]\)"):
    validation.validate(c)
  c = cli.load_config_file("configs/pyramidclip_b16.py:runlocal")
  c.objective_cfg.pyramidclip.negative_smoothing = 1.5
  with pytest.raises(errors.ConfigError, match=r"negative_smoothing=1.5"):
    validation.validate(c)


def test_recipe():
  full = _recipe("")
  assert dict(full.objectives) == {"pyramidclip": 1.0}
  assert list(full.data.crop_scale) == [0.9, 1.0]
  assert dict(full.data.views.local) == {"count": 1, "size": 0,
                                         "crop_scale": [0.5, 1.0]}
  assert full.data.text_views.short.kind == "first_sentence"
  assert full.model.name == "two_tower" and full.model.image.variant == "B/16"
  assert full.total_steps == 32 * 15_000_000 // full.batch_size


def test_recipe_runs_two_steps_on_shapes(tmp_path):
  c = cli.load_config_file("configs/pyramidclip_b16.py:runlocal")
  c.update(batch_size=8, total_steps=2, checkpoint_every=0, log_every=1, plot=False)
  c.evals = {}
  loop.run(c, str(tmp_path))
  rows = [r for r in metric_writer.read_metrics(str(tmp_path / "metrics.jsonl"))
          if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"])
    assert r["loss"] == pytest.approx(r["pyramidclip/peer_loss"] +
                                      r["pyramidclip/cross_loss"], rel=1e-5)
    # The views differ from the image and the caption, so the terms differ.
    terms = [r[f"pyramidclip/{t}_loss"] for t in ("global_short", "local_full",
                                                   "global_full", "local_short")]
    assert len({round(t, 6) for t in terms}) == 4
