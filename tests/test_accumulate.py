"""Gradient accumulation with all negatives (accum_steps) equals the full-batch step."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import test_train
from vlp_jax import validation
from vlp_jax import sharding
from vlp_jax.data import pipeline
from vlp_jax.models import build_model
from vlp_jax.train import accumulate, loop, state as state_lib, step as step_lib

K = 4
BATCH = 16


def clip_config():
  c = test_train.tiny_config()
  c.batch_size = BATCH
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.model.name = "two_tower"
  c.objectives = {"clip": 1.0}
  c.optim.update(warmup_steps=0, lr=1e-3)
  return c


def siglip_config():
  c = clip_config()
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0
  c.objectives = {"siglip": 1.0}
  return c


def coca_config():
  c = test_train.tiny_config()
  c.batch_size = BATCH
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.objectives = {"clip": 1.0, "caption": 2.0}
  return c


def _max_abs(tree):
  return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree))


def assert_grads_close(actual, expected):
  """float32 agreement of every leaf: rtol 1e-5 plus an atol of 1e-5 of the leaf's
  largest magnitude and 1e-7 of the whole gradient's (micro-batch and full-batch sums
  round differently; a few tiny leaves are cancellations of larger terms)."""
  floor = 1e-7 * _max_abs(expected)

  def close(a, e):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * _max_abs(e) + floor)
  jax.tree.map(close, actual, expected)


def assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


@functools.cache
def batches(n=2):
  config = coca_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  return [next(it) for _ in range(n)]


@functools.cache
def setup(make_config):
  """(experiment, initial params) on one device; the params are never donated."""
  config = make_config()
  exp = loop.Experiment(config, "/unused", jax.devices()[:1])
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  return exp, state.params


def capture_grads():
  """An optax stage that passes updates through and keeps them as its state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))


def micro_outputs(model, params, micro, rng):
  """Outputs of every micro-batch [K, b, ...], micro-batch k with fold_in(rng, k)."""
  keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(K))
  return jax.vmap(lambda mb, key: model.apply(
      {"params": params}, mb, train=True, rngs={"dropout": key}))(micro, keys)


def test_split_and_merge_are_inverse():
  x = jnp.arange(8 * 3).reshape(8, 3)
  micro = accumulate.split_microbatches(x, 4)
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1, :, 0], [3, 15])  # rows 1 and 5
  np.testing.assert_array_equal(accumulate.merge_microbatches(micro), x)
  with pytest.raises(ValueError, match="not divisible into accum_steps=3"):
    accumulate.split_microbatches(x, 3)


# slow: in make test, clip with accumulation is checked by test_objective_contract.py
# and siglip (on 8 devices) by tests/multidevice/test_sharded_train.py.
@pytest.mark.slow
@pytest.mark.parametrize("make_config", [clip_config, siglip_config],
                         ids=["clip", "siglip"])
def test_contrastive_step_equals_full_batch(make_config):
  """A train step with accum_steps=K: the same gradient (every leaf, logit scale and
  bias included), metrics and new params as accum_steps=1."""
  exp, init_params = setup(make_config)
  batch = batches()[0]

  def run(accum_steps):
    config = make_config()
    config.accum_steps = accum_steps
    tx = optax.chain(capture_grads(), exp.tx)  # opt_state[0] = the gradient.
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=init_params,
        opt_state=tx.init(init_params), rng=jax.random.PRNGKey(1))
    state = jax.tree.map(jnp.copy, state)  # The step donates it.
    fn = step_lib.make_train_step(
        exp.model, step_lib.objectives_from_config(config), tx, exp.schedule,
        jax.tree.map(lambda x: x.sharding, state), sharding.batch_sharding(exp.mesh),
        accum_steps=config.accum_steps)
    with jax.set_mesh(exp.mesh):
      state, metrics = fn(state, sharding.make_global_batch(batch, exp.mesh))
    return jax.device_get((state.opt_state[0], metrics, state.params))

  ref_grads, ref_metrics, ref_params = run(1)
  grads, metrics, params = run(K)
  assert_grads_close(grads, ref_grads)
  # The temperature (and bias) get their full-batch gradient, not K times it.
  assert abs(float(ref_grads["scale"]["logit_scale"])) > 1e-4
  assert_close(grads["scale"]["logit_scale"], ref_grads["scale"]["logit_scale"])
  if "logit_bias" in ref_grads["scale"]:
    assert_close(grads["scale"]["logit_bias"], ref_grads["scale"]["logit_bias"])
  assert set(metrics) == set(ref_metrics)
  jax.tree.map(assert_close, metrics, ref_metrics)
  # Adam's first update lr * g / (|g| + eps) amplifies rounding noise by up to 1/eps
  # where |g| ~ eps: the params agree to 1% of one update (lr = 1e-3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               params, ref_params)
  assert _max_abs(jax.tree.map(np.subtract, ref_params, init_params)) > 1e-4  # It moved.


def test_coca_clip_full_batch_caption_mean_of_micro_batches():
  """clip: the full-batch gradient; caption: the mean of the micro-batch gradients
  (not the full-batch token mean, as micro-batches hold different token counts)."""
  config = coca_config()
  exp, params = setup(coca_config)
  objectives = step_lib.objectives_from_config(config)
  clip_obj = [o for o in objectives if o.name == "clip"]
  cap = [o for o in objectives if o.name == "caption"][0]
  batch = jax.tree.map(jnp.asarray, batches()[0])
  rng = jax.random.PRNGKey(2)

  def reference(p):
    clip_loss, _ = step_lib.compute_loss(p, exp.model, clip_obj, batch, rng)
    micro = accumulate.split_microbatches(batch, K)
    outs = micro_outputs(exp.model, p, micro, rng)
    cap_losses = jax.vmap(lambda o, mb: cap.fn(o, mb, cap.cfg)[0])(outs, micro)
    return clip_loss + cap.weight * jnp.mean(cap_losses), (clip_loss, cap_losses)

  (ref_loss, (clip_loss, cap_losses)), ref_g = jax.jit(
      jax.value_and_grad(reference, has_aux=True))(params)
  g, m = jax.jit(lambda p: accumulate.accumulated_grads(
      p, exp.model, objectives, batch, rng, K))(params)
  assert_grads_close(g, ref_g)
  assert_close(m["loss"], ref_loss)
  assert_close(m["clip/loss"], clip_loss)
  assert_close(m["caption/loss"], jnp.mean(cap_losses))
  assert np.ptp(np.asarray(cap_losses)) > 0  # The micro-batch losses differ.
  assert set(m) == {"loss", "logit_scale", "clip/loss", "clip/i2t_acc", "clip/t2i_acc",
                    "clip/logit_scale", "caption/loss", "caption/token_acc"}


def test_dropout_uses_one_rng_per_micro_batch():
  """With dropout, accumulation equals the full-batch loss on embeddings whose
  dropout masks are drawn per micro-batch with fold_in(rng, k)."""
  config = clip_config()
  config.model.image.dropout = 0.2
  config.model.text.dropout = 0.2
  model = build_model(config.model)
  exp, params = setup(clip_config)
  objectives = step_lib.objectives_from_config(config)
  batch = jax.tree.map(jnp.asarray, batches()[0])
  rng = jax.random.PRNGKey(3)

  def reference(p):
    outs = micro_outputs(model, p, accumulate.split_microbatches(batch, K), rng)
    full = {n: accumulate.merge_microbatches(outs[n]) for n in ("image_emb", "text_emb")}
    full["logit_scale"] = outs["logit_scale"][0]
    plain, _ = step_lib.compute_loss(p, exp.model, objectives, batch, rng)
    return objectives[0].fn(full, batch, objectives[0].cfg)[0], plain

  (ref_loss, plain), ref_g = jax.jit(jax.value_and_grad(reference, has_aux=True))(
      params)
  g, m = jax.jit(lambda p: accumulate.accumulated_grads(
      p, model, objectives, batch, rng, K))(params)
  assert_grads_close(g, ref_g)
  assert_close(m["loss"], ref_loss)
  # Dropout is active: the loss differs from the dropout-free one.
  assert abs(float(plain) - float(ref_loss)) > 1e-4


def test_accum_steps_must_divide_batch_size():
  config = clip_config()
  config.accum_steps = 3
  with pytest.raises(ValueError, match=r"config.batch_size=16 cannot be divided evenly: "
                                       r"each of the config.accum_steps=3"):
    loop.Experiment(config, "/unused", jax.devices()[:1])
  config.accum_steps = 0
  with pytest.raises(ValueError, match="accum_steps must be positive, got 0"):
    validation.validate(config)
  config.accum_steps = 4
  validation.validate(config)
  assert loop.Experiment(config, "/unused", jax.devices()[:1]).batch.micro_batch == 4
