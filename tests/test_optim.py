"""Tests for the optimizer: schedule, weight-decay mask, decoupled decay, clipping."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlp_jax import config as config_lib
from vlp_jax.models import build_model
from vlp_jax.train import optim

NO_DECAY_NAMES = ("scale", "bias", "embedding", "pos_embedding", "cls", "probe",
                  "logit_scale", "logit_bias")


def _optim_cfg(**kw):
  c = config_lib.default_config().optim
  c.update(kw)
  return c


# --------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_and_cosine():
  cfg = _optim_cfg(lr=1e-3, warmup_steps=10, end_lr_ratio=0.1)
  s = optim.lr_schedule(cfg, 110)
  peak, end = 1e-3, 1e-4
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), peak / 2, rtol=1e-6)  # linear warmup
  np.testing.assert_allclose(float(s(10)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), (peak + end) / 2, rtol=1e-5)  # cosine middle
  for step in (25, 85, 105):
    want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), end, rtol=1e-6)
  np.testing.assert_allclose(float(s(500)), end, rtol=1e-6)  # stays at the end value
  values = [float(s(i)) for i in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_lr_schedule_decays_to_zero_by_default():
  s = optim.lr_schedule(_optim_cfg(lr=5e-4, warmup_steps=100), 1000)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(100)), 5e-4, rtol=1e-6)
  assert abs(float(s(1000))) < 1e-12


def test_lr_schedule_warmup_longer_than_run():
  # Warmup is shortened so the run still reaches the peak (at its last step but one).
  s = optim.lr_schedule(_optim_cfg(lr=1e-3, warmup_steps=100, end_lr_ratio=0.0), 10)
  np.testing.assert_allclose(float(s(9)), 1e-3, rtol=1e-6)
  assert 0 < float(s(5)) < 1e-3


# ------------------------------------------------------------------------ decay mask


def _tiny_model_config(pool):
  c = config_lib.default_config().model
  c.embed_dim = 16
  c.use_logit_bias = True
  c.image.update(variant="", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4,
                 pool=pool)
  c.text.update(vocab_size=300, width=32, depth=1, num_heads=2, mlp_dim=64,
                context_length=8)
  return c


@pytest.fixture(scope="module", params=["cls", "map"])
def boxed_params(request):
  model = build_model(_tiny_model_config(request.param))
  batch = {"image": jnp.zeros((1, 16, 16, 3)), "text": jnp.zeros((1, 8), jnp.int32)}
  return jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]


def _named_leaves(tree, is_leaf=None):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in flat}


def _check_mask(params, mask, is_leaf=None):
  names = _named_leaves(params, is_leaf)
  masks = _named_leaves(mask)
  assert set(names) == set(masks) and names
  for name, m in masks.items():
    leaf = name.rsplit("/", 1)[-1]
    assert isinstance(m, bool), name
    assert m == (leaf == "kernel"), name
    if not m:
      assert leaf in NO_DECAY_NAMES, name
  leaves = {name.rsplit("/", 1)[-1] for name in names}
  return leaves, sum(masks.values())


def test_decay_mask_on_boxed_params(boxed_params):
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  assert any(is_box(x) for x in jax.tree.leaves(boxed_params, is_leaf=is_box))
  mask = optim.decay_mask(boxed_params)
  leaves, n_kernels = _check_mask(boxed_params, mask, is_leaf=is_box)
  assert {"kernel", "bias", "scale", "embedding", "pos_embedding", "logit_scale",
          "logit_bias"} <= leaves
  assert leaves & {"cls", "probe"}
  assert n_kernels >= 10  # patch embedding, q/k/v/o, mlp, projections, in both towers


def test_decay_mask_on_unboxed_params(boxed_params):
  params = nn.meta.unbox(boxed_params)
  mask = optim.decay_mask(params)
  leaves, _ = _check_mask(params, mask)
  assert leaves & {"cls", "probe"}
  # Same decisions as for the boxed tree.
  boxed_mask = optim.decay_mask(boxed_params)
  assert _named_leaves(mask) == _named_leaves(boxed_mask)


# ----------------------------------------------------------------- decoupled decay


def _one_step(tx, grads, params):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_weight_decay_only_shrinks_kernels(boxed_params):
  params = nn.meta.unbox(boxed_params)
  lr, wd = 0.1, 0.5
  tx, schedule = optim.make_optimizer(
      _optim_cfg(lr=lr, warmup_steps=0, weight_decay=wd, grad_clip_norm=1.0), 100)
  assert float(schedule(0)) == pytest.approx(lr)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = jax.jit(_one_step, static_argnums=0)(tx, zeros, params)
  old_named, new_named = _named_leaves(params), _named_leaves(new)
  shrunk = 0
  for name, p in old_named.items():
    p, q = np.asarray(p), np.asarray(new_named[name])
    if name.endswith("kernel"):
      np.testing.assert_allclose(q, p * (1 - lr * wd), rtol=1e-5, atol=1e-7)
      shrunk += int(np.abs(p).sum() > 0)
    else:
      np.testing.assert_array_equal(q, p, err_msg=name)
  assert shrunk >= 10


def test_weight_decay_on_boxed_params(boxed_params):
  # The mask also lines up with a boxed tree (optax masks by tree prefix).
  tx, _ = optim.make_optimizer(
      _optim_cfg(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0), 100)
  zeros = jax.tree.map(jnp.zeros_like, boxed_params)
  new = jax.jit(_one_step, static_argnums=0)(tx, zeros, boxed_params)
  old_named = _named_leaves(nn.meta.unbox(boxed_params))
  new_named = _named_leaves(nn.meta.unbox(new))
  for name, p in old_named.items():
    factor = 0.95 if name.endswith("kernel") else 1.0
    np.testing.assert_allclose(np.asarray(new_named[name]), np.asarray(p) * factor,
                               rtol=1e-5, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------- clipping


def _mu(opt_state):
  return optax.tree_utils.tree_get(opt_state, "mu")


@pytest.mark.parametrize("clip", [1.0, 0.25])
def test_gradient_clipping_bounds_the_gradient_seen_by_adam(clip):
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros((3,))}}
  b1 = 0.9
  tx, _ = optim.make_optimizer(
      _optim_cfg(lr=1e-3, warmup_steps=0, b1=b1, weight_decay=0.0, grad_clip_norm=clip),
      10)
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  updates, state = tx.update(huge, tx.init(params), params)
  # Adam's first moment holds (1 - b1) * the clipped gradient: norm = (1 - b1) * clip.
  np.testing.assert_allclose(float(optax.tree.norm(_mu(state))), (1 - b1) * clip,
                             rtol=1e-5)
  # And the update itself is finite and bounded by lr per coordinate.
  n = sum(p.size for p in jax.tree.leaves(params))
  norm = float(optax.tree.norm(updates))
  assert np.isfinite(norm) and norm <= 1e-3 * math.sqrt(n) * 1.001
  # Small gradients pass unchanged.
  small = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  _, state = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(_mu(state))),
                             (1 - b1) * float(optax.tree.norm(small)), rtol=1e-5)


def test_no_clipping_when_disabled():
  params = {"kernel": jnp.ones((4, 3))}
  tx, _ = optim.make_optimizer(
      _optim_cfg(lr=1e-3, warmup_steps=0, b1=0.9, weight_decay=0.0, grad_clip_norm=0.0),
      10)
  huge = {"kernel": jnp.full((4, 3), 1e6)}
  _, state = tx.update(huge, tx.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(_mu(state))),
                             0.1 * float(optax.tree.norm(huge)), rtol=1e-5)


# --------------------------------------------------------------------------- LAMB


def test_lamb_first_step_is_the_trust_ratio_scaled_adam_direction():
  """LAMB (You et al. 2019), step 1 with bias correction: r = g / (|g| + eps) per
  coordinate, u = r + wd * w on decayed leaves, and w' = w - lr * (|w| / |u|) * u per
  leaf (ratio 1 where |w| or |u| is 0)."""
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                       params)
  lr, wd, eps = 0.1, 0.3, 1e-6
  tx, _ = optim.make_optimizer(_optim_cfg(name="lamb", lr=lr, warmup_steps=0,
                                          weight_decay=wd, eps=eps, grad_clip_norm=0.0),
                               10)
  new = _one_step(tx, grads, params)
  for name in ("kernel", "bias"):
    w = np.asarray(params["dense"][name], np.float64)
    g = np.asarray(grads["dense"][name], np.float64)
    u = g / (np.abs(g) + eps) + (wd * w if name == "kernel" else 0.0)
    ratio = np.linalg.norm(w) / np.linalg.norm(u)
    np.testing.assert_allclose(np.asarray(new["dense"][name]), w - lr * ratio * u,
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_unknown_optimizer_name_is_a_config_error():
  from vlp_jax import errors, validation  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.optim.name = "adam"
  with pytest.raises(errors.ConfigError, match=r"optim.name='adam'.*\['adamw', 'lamb'\]"):
    validation.validate(c)
