"""On 8 simulated devices, every mesh gives the single-device losses and parameters."""
import functools
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import test_train
from vlp_jax import config as config_lib, sharding
from vlp_jax.data import pipeline
from vlp_jax.train import loop, queue as queue_lib, state as state_lib
from vlp_jax.train import step as step_lib, teacher as teacher_lib

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
}


def coca_config():
  return test_train.tiny_config()


def siglip_config():
  c = test_train.tiny_config()
  c.batch_size = 32  # The accumulation test's batch: one single-device reference.
  c.model.name = "two_tower"
  c.model.image.pool = "map"
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0
  c.objectives = {"siglip": 1.0}
  # A momentum teacher of the image tower rides along: sharded like its params, its
  # EMA update is part of the step that must equal one device's.
  c.teacher.params = ["img/.*"]
  c.teacher.momentum = 0.5
  # And a memory queue of its embeddings (sharded rows, enqueued in the step; wraps
  # after two steps).
  c.queue.update(size=64, entries={"image": "teacher_image_emb",
                                   "text": "teacher_text_emb"})
  return c


CONFIGS = {"coca": coca_config, "siglip": siglip_config}


def train(config, devices, batches):
  """Three train steps from the same init; returns (losses, {'params', 'teacher',
  'queue'}) on the host."""
  exp = loop.Experiment(config, "/unused", devices)
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  fn = step_lib.make_train_step(exp.model, step_lib.objectives_from_config(config),
                                exp.tx, exp.schedule, exp.state_shardings,
                                sharding.batch_sharding(exp.mesh, exp.rules),
                                accum_steps=config.accum_steps,
                                teacher_momentum=exp.teacher_momentum,
                                queue_entries=queue_lib.entries(config) or None)
  losses = []
  with jax.set_mesh(exp.mesh), nn.logical_axis_rules(exp.rules):
    for b in batches:
      state, m = fn(state, sharding.make_global_batch(b, exp.mesh, exp.rules))
      losses.append(float(m["loss"]))
  if state.teacher is not None:  # Sharded exactly like the parameters it copies.
    want = teacher_lib.like(exp.state_shardings.params, exp.state_shardings.teacher)
    assert [x.sharding for x in jax.tree.leaves(state.teacher)] == jax.tree.leaves(want)
  if state.queue is not None:  # Rows over the data-parallel axes.
    for name, rows in state.queue.items():
      want = exp.state_shardings.queue[name]
      assert rows.sharding == want, name
  return np.array(losses), jax.device_get({"params": state.params,
                                           "teacher": state.teacher,
                                           "queue": state.queue})


def first_batches(config, n=3):
  """The first `n` host batches of `config`'s training data."""
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  return [next(it) for _ in range(n)]


def single_device(config_fn, batches):
  """`train` of `config_fn()` on one device: (losses, state)."""
  config = config_fn()
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  return train(config, jax.devices()[:1], batches)


def mesh_and_single_device(config_fn, mesh="data2_fsdp2_tensor2"):
  """(batches, (losses, state) on mesh `mesh`, (losses, state) on one device) for
  three steps of `config_fn()`'s data from the same init."""
  batches = first_batches(config_fn())
  config = config_fn()
  config.mesh = MESHES[mesh]
  return batches, train(config, jax.devices(), batches), single_device(config_fn,
                                                                        batches)


@functools.cache
def reference(name):
  batches = first_batches(CONFIGS[name]())
  return batches, single_device(CONFIGS[name], batches)


def assert_close(actual, expected):
  """float32 agreement: |a - b| <= 1e-6 + 1e-5 |b| (relative 1e-5 with a tiny floor)."""
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# `make test` covers all three axes at once (data, fsdp, tensor) here and with
# accumulation below, data8 with accumulation in test_objective_contract_md.py, and
# CoCa's params on every mesh in test_resharding_restore.py; the remaining
# combinations are `slow` (`make test-all`).
FAST_CASES = {("siglip", "data2_fsdp2_tensor2")}


def _cases(names, meshes, fast):
  return [pytest.param(n, m, marks=() if (n, m) in fast else pytest.mark.slow)
          for n in names for m in meshes]


@pytest.mark.parametrize("name,mesh", _cases(CONFIGS, MESHES, FAST_CASES))
def test_mesh_matches_single_device(name, mesh):
  assert jax.device_count() == 8
  batches, (ref_losses, ref_params) = reference(name)
  config = CONFIGS[name]()
  config.mesh = MESHES[mesh]
  losses, params = train(config, jax.devices(), batches)
  assert_close(losses, ref_losses)
  jax.tree.map(assert_close, params, ref_params)
  # Training moved the parameters (the comparison is not between two inits).
  assert not np.allclose(ref_losses[0], ref_losses[-1])


def test_parallelism_is_a_config_change():
  """FSDP shards kernels' embed axis over fsdp; a rule override turns that off."""
  config = coca_config()
  config.mesh = MESHES["data2_fsdp2_tensor2"]
  exp = loop.Experiment(config, "/unused")
  fc1 = exp.state_shardings.params["txt"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert tuple(fc1.spec) == ("fsdp", "tensor")
  assert fc1.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  # Adam's moments follow their parameters.
  mu = exp.state_shardings.opt_state[1][0].mu["txt"]["encoder"]["block_0"]["mlp"]["fc1"]
  assert tuple(mu["kernel"].spec) == ("fsdp", "tensor")
  config.sharding_rules.embed = ""
  config.sharding_rules.mlp = "fsdp,tensor"
  exp = loop.Experiment(config, "/unused")
  fc1 = exp.state_shardings.params["txt"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert tuple(fc1.spec) == (None, ("fsdp", "tensor"))


@pytest.mark.parametrize("name", ["siglip", pytest.param("coca", marks=pytest.mark.slow)])
def test_accumulation_on_a_mesh_matches_one_device_full_batch(name):
  """accum_steps=4 on (data=2, fsdp=2, tensor=2) equals the plain full-batch step on
  one device (CoCa: clip only, since caption losses accumulate as a mean of
  micro-batch means). The mesh is test_mesh_matches_single_device's fast one: the
  same state initialiser; siglip's reference run is that test's too."""
  def config_fn():
    c = CONFIGS[name]()
    c.batch_size = 32
    if name == "coca":
      c.objectives = {"clip": 1.0}
    return c
  config = config_fn()
  if config_lib.to_dict(config) == config_lib.to_dict(CONFIGS[name]()):
    batches, (ref_losses, ref_params) = reference(name)
  else:
    it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
    batches = [next(it) for _ in range(2)]
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    ref_losses, ref_params = train(config, jax.devices()[:1], batches)
  config = config_fn()
  config.mesh = MESHES["data2_fsdp2_tensor2"]
  config.accum_steps = 4
  losses, params = train(config, jax.devices(), batches)
  assert_close(losses, ref_losses)
  # Adam's first steps magnify rounding noise on near-zero gradients: atol 1e-5 is
  # 1% of one update at lr 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               params, ref_params)


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error():
  config = coca_config()
  config.batch_size = 12
  config.mesh = MESHES["data8"]
  with pytest.raises(ValueError, match=r"batch_size=12 .* split over the 8 data-parallel "
                     r"shards of mesh .* multiple of 8; use e.g. 8 or 16"):
    loop.Experiment(config, "/unused")
  config.batch_size, config.accum_steps = 32, 8
  with pytest.raises(ValueError, match=r"accum_steps=8 micro-batches .* multiple of 64"):
    loop.Experiment(config, "/unused")


def coca_scan_config():
  c = coca_config()
  c.model.update(scan_layers=True, fused_qkv=True, remat="save_qkv_proj")
  c.model.image.depth = 2
  return c


@pytest.mark.slow  # scan/fused/remat are each checked on one device (test_perf_features).
@pytest.mark.parametrize("mesh", ["data2_fsdp2_tensor2", "fsdp8"])
def test_scan_fused_remat_on_a_mesh_matches_single_device(mesh):
  """Scanned blocks (stacked `layers` axis unsharded), fused QKV (heads over tensor)."""
  config = coca_scan_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batches = [next(it) for _ in range(3)]
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  ref_losses, ref_params = train(config, jax.devices()[:1], batches)
  config = coca_scan_config()
  config.mesh = MESHES[mesh]
  losses, params = train(config, jax.devices(), batches)
  assert_close(losses, ref_losses)
  jax.tree.map(assert_close, params, ref_params)
  assert ref_params["params"]["img"]["encoder"]["layers"]["block"]["attn"][
      "qkv_kernel"].shape[0] == 2
