"""Gradient accumulation with all negatives equals the full-batch step."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from vlp_jax import config as config_lib
from vlp_jax import sharding
from vlp_jax.data import pipeline
from vlp_jax.train import accumulate, loop, state as state_lib, step as step_lib

K = 4
BATCH = 16


def clip_config():
  c = test_train.tiny_config()
  c.batch_size = BATCH
  c.model.name = "two_tower"
  c.objectives = {"clip": 1.0}
  return c


def siglip_config():
  c = clip_config()
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0
  c.objectives = {"siglip": 1.0}
  return c


def coca_config(dropout=0.0):
  c = test_train.tiny_config()
  c.batch_size = BATCH
  c.model.image.dropout = dropout
  c.model.text.dropout = dropout
  return c


def assert_close(actual, expected):
  """float32 agreement: rtol 1e-5 per element plus an atol of 1e-5 of the leaf's
  largest magnitude (the micro-batch and full-batch sums round differently)."""
  expected = np.asarray(expected)
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale + 1e-12)


@functools.cache
def _batches(name, n=1):
  config = coca_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  return [next(it) for _ in range(n)]


def setup(config):
  """(experiment, initial state, first batch) on one device."""
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  exp = loop.Experiment(config, "/unused", jax.devices()[:1])
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  batch = jax.tree.map(jnp.asarray, _batches("shapes")[0])
  return exp, state, batch


def full_grads(exp, config, params, batch, rng):
  fn = jax.jit(lambda p: jax.grad(step_lib.compute_loss, has_aux=True)(
      p, exp.model, step_lib.objectives_from_config(config), batch, rng))
  return fn(params)


def accum_grads(exp, config, params, batch, rng):
  fn = jax.jit(lambda p: accumulate.accumulated_grads(
      p, exp.model, step_lib.objectives_from_config(config), batch, rng, K))
  return fn(params)


def reference_grads(exp, config, params, batch, rng):
  """Per-micro-batch forwards (rng fold_in(rng, k)) merged for batch-global
  objectives; per-example objectives averaged over micro-batches."""
  objectives = step_lib.objectives_from_config(config)
  micro = accumulate.split_microbatches(batch, K)

  def loss(p):
    outs, losses = [], []
    for k in range(K):
      mb = jax.tree.map(lambda x, k=k: x[k], micro)
      out = exp.model.apply({"params": p}, mb, train=True,
                            rngs={"dropout": jax.random.fold_in(rng, k)})
      outs.append(out)
      losses.append(sum(o.weight * o.fn(out, mb, o.cfg)[0] for o in objectives
                        if not accumulate.is_batch_global(o)))
    full = {n: accumulate.merge_microbatches(jnp.stack([o[n] for o in outs]))
            for n in accumulate.CACHED_KEYS}
    full.update({n: v for n, v in outs[0].items() if jnp.ndim(v) == 0})
    total = sum(losses) / K
    for o in objectives:
      if accumulate.is_batch_global(o):
        total = total + o.weight * o.fn(full, batch, o.cfg)[0]
    return total

  return jax.jit(jax.value_and_grad(loss))(params)


def test_split_and_merge_are_inverse():
  x = jnp.arange(8 * 3).reshape(8, 3)
  micro = accumulate.split_microbatches(x, 4)
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1, :, 0], [3, 15])  # rows 1 and 5
  np.testing.assert_array_equal(accumulate.merge_microbatches(micro), x)
  with pytest.raises(ValueError, match="not divisible into accum_steps=3"):
    accumulate.split_microbatches(x, 3)


@pytest.mark.parametrize("make_config", [clip_config, siglip_config],
                         ids=["clip", "siglip"])
def test_contrastive_grads_equal_full_batch(make_config):
  config = make_config()
  exp, state, batch = setup(config)
  rng = jax.random.PRNGKey(1)
  ref_g, ref_m = full_grads(exp, config, state.params, batch, rng)
  g, m = accum_grads(exp, config, state.params, batch, rng)
  assert set(m) == set(ref_m)
  jax.tree.map(assert_close, m, ref_m)
  jax.tree.map(assert_close, g, ref_g)
  # The temperature (and bias) get their full-batch gradient, not K times it.
  scale_grad = g["scale"]["logit_scale"]
  assert abs(float(scale_grad)) > 1e-6
  assert_close(scale_grad, ref_g["scale"]["logit_scale"])
  if "logit_bias" in ref_g["scale"]:
    assert_close(g["scale"]["logit_bias"], ref_g["scale"]["logit_bias"])


def test_coca_clip_full_batch_caption_mean_of_micro_batches():
  config = coca_config()
  config.objectives = {"clip": 1.0, "caption": 2.0}
  exp, state, batch = setup(config)
  rng = jax.random.PRNGKey(2)
  g, m = accum_grads(exp, config, state.params, batch, rng)
  ref_loss, ref_g = reference_grads(exp, config, state.params, batch, rng)
  jax.tree.map(assert_close, g, ref_g)
  assert_close(m["loss"], ref_loss)
  # The contrastive part is the full-batch one (clip alone equals its full-batch grad).
  config.objectives = {"clip": 1.0}
  full_g, full_m = full_grads(exp, config, state.params, batch, rng)
  clip_g, clip_m = accum_grads(exp, config, state.params, batch, rng)
  jax.tree.map(assert_close, clip_g, full_g)
  assert_close(m["clip/loss"], full_m["clip/loss"])
  assert_close(m["loss"], m["clip/loss"] + 2 * m["caption/loss"])
  assert set(m) == {"loss", "logit_scale", "clip/loss", "clip/i2t_acc", "clip/t2i_acc",
                    "clip/logit_scale", "caption/loss", "caption/token_acc"}


def test_dropout_uses_one_rng_per_micro_batch():
  """With dropout, accumulation equals a full batch whose masks are drawn per
  micro-batch with fold_in(rng, k) (pass 2 reproduces pass 1's embeddings)."""
  config = coca_config(dropout=0.2)
  exp, state, batch = setup(config)
  rng = jax.random.PRNGKey(3)
  g, m = accum_grads(exp, config, state.params, batch, rng)
  ref_loss, ref_g = reference_grads(exp, config, state.params, batch, rng)
  jax.tree.map(assert_close, g, ref_g)
  assert_close(m["loss"], ref_loss)


@pytest.mark.parametrize("make_config", [clip_config, siglip_config],
                         ids=["clip", "siglip"])
def test_train_steps_equal_accum_1(make_config):
  batches = _batches("shapes", 3)

  def run(accum_steps):
    config = make_config()
    config.accum_steps = accum_steps
    config.optim.update(warmup_steps=1, lr=1e-3)
    exp, state, _ = setup(config)
    fn = step_lib.make_train_step(
        exp.model, step_lib.objectives_from_config(config), exp.tx, exp.schedule,
        exp.state_shardings, sharding.batch_sharding(exp.mesh),
        accum_steps=config.accum_steps)
    metrics = []
    with jax.set_mesh(exp.mesh):
      for b in batches:
        state, m = fn(state, sharding.make_global_batch(b, exp.mesh))
        metrics.append(jax.device_get(m))
    return metrics, jax.device_get(state.params)

  ref_metrics, ref_params = run(1)
  metrics, params = run(K)
  for m, ref in zip(metrics, ref_metrics):
    assert set(m) == set(ref)
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], ref["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params, ref_params)
  assert not np.allclose(ref_metrics[0]["loss"], ref_metrics[-1]["loss"])


def test_accum_steps_must_divide_batch_size():
  config = clip_config()
  config.accum_steps = 3
  with pytest.raises(ValueError, match=r"batch_size=16 must be divisible by "
                                       r"config.accum_steps=3"):
    config_lib.validate(config)
  config.accum_steps = 0
  with pytest.raises(ValueError, match="accum_steps=0"):
    config_lib.validate(config)
  config.accum_steps = 4
  config_lib.validate(config)
