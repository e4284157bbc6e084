"""On 8 simulated devices (batch over data), a batch-global objective reading token
outputs gives the single-device gradient, with and without accumulation.

The objective is tests/contract_objective.py (token-wise late interaction over
image_tokens/text_tokens); its single-device accumulation test is
tests/test_objective_contract.py.
"""
import flax.linen as nn
import jax
import numpy as np

from tests import contract_objective, test_train
from tests.multidevice import test_sharded_train
from vlp_jax import sharding
from vlp_jax.data import pipeline
from vlp_jax.train import loop, state as state_lib, step as step_lib


def config_fn():
  c = contract_objective.config(test_train.tiny_config())
  c.batch_size = 16
  c.objectives = {contract_objective.NAME: 1.0}  # clip+token on one device: enough.
  return c


def gradients(config, devices, batch, params):
  """(grads, metrics) of one step at `params` (placed as the mesh shards them)."""
  exp = loop.Experiment(config, "/unused", devices)
  params = jax.device_put(params, exp.state_shardings.params)
  objectives = step_lib.objectives_from_config(config)
  rng = jax.random.PRNGKey(5)
  fn = jax.jit(lambda p, b: step_lib.gradients(p, exp.model, objectives, b, rng,
                                               config.accum_steps))
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    out = fn(params, sharding.make_global_batch(batch, exp.mesh, exp.rules))
  return jax.device_get(out)


def test_token_objective_on_data8_with_accumulation_matches_one_device():
  """data=8 and accum_steps=2 (micro-batches of 8, one row per device): the token
  arrays are cached sharded over the devices; gradients and metrics equal the plain
  full-batch step on one device."""
  assert jax.device_count() == 8
  config = config_fn()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batch = next(it)
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  exp = loop.Experiment(config, "/unused", jax.devices()[:1])
  params = jax.device_get(
      state_lib.create_state(exp.model, exp.tx, config, exp.mesh).params)
  ref_g, ref_m = gradients(config, jax.devices()[:1], batch, params)
  config = config_fn()
  config.mesh = test_sharded_train.MESHES["data8"]
  config.accum_steps = 2
  g, m = gradients(config, jax.devices(), batch, params)
  assert abs(float(ref_g["scale"]["logit_scale"])) > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               m, ref_m)
  # Gradients: rtol 1e-5 with a floor of 1e-5 of each leaf's largest magnitude (the
  # sharded and micro-batched sums round differently; see tests/test_accumulate.py).
  def close(a, e):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * np.max(np.abs(e)) + 1e-9)
  jax.tree.map(close, g, ref_g)
