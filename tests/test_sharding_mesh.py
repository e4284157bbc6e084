"""Tests for the device mesh built from `config.mesh` and global batches."""
import jax
import ml_collections
import numpy as np
import pytest

from vlp_jax import config as config_lib
from vlp_jax import sharding


@pytest.mark.parametrize("mesh_cfg,num_devices,want", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4, 1)),
    ({"data": -1, "fsdp": 1, "tensor": 1}, 1, (1, 1, 1)),
    ({"data": 1, "fsdp": 2, "tensor": -1}, 8, (1, 2, 4)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"tensor": -1, "data": 4}, 8, (4, 1, 2)),  # order of keys does not matter
    ({}, 1, (1, 1, 1)),
])
def test_mesh_shape_resolution(mesh_cfg, num_devices, want):
  assert sharding.mesh_shape(mesh_cfg, num_devices) == want


def test_mesh_shape_from_default_config():
  mesh_cfg = config_lib.default_config().mesh
  assert isinstance(mesh_cfg, ml_collections.ConfigDict)
  assert sharding.mesh_shape(mesh_cfg, 16) == (16, 1, 1)


def test_mesh_shape_two_wildcards():
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_mesh_shape_not_divisible():
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)


def test_mesh_shape_unknown_axis():
  with pytest.raises(KeyError, match="model"):
    sharding.mesh_shape({"data": -1, "model": 2}, 8)


@pytest.mark.parametrize("mesh_cfg,num_devices,needs", [
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices"),
    ({"data": 16}, 8, "needs 16 devices"),
    ({"data": 1}, 2, "needs 1 devices"),
])
def test_mesh_shape_wrong_product(mesh_cfg, num_devices, needs):
  with pytest.raises(ValueError, match=needs):
    sharding.mesh_shape(mesh_cfg, num_devices)


def test_make_mesh_on_one_device():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
  assert list(mesh.devices.flat) == devices
  with pytest.raises(ValueError, match="needs 2 devices"):
    sharding.make_mesh({"data": 2}, devices)


def test_batch_sharding_spec():
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  s = sharding.batch_sharding(mesh)
  assert isinstance(s, jax.sharding.NamedSharding)
  assert s.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_make_global_batch_values():
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
           "text": rng.integers(0, 300, (4, 16)).astype(np.int32)}
  batch = sharding.make_global_batch(local, mesh)
  assert set(batch) == {"image", "text"}
  for k, v in local.items():
    assert isinstance(batch[k], jax.Array)
    assert batch[k].shape == v.shape and batch[k].dtype == v.dtype
    assert batch[k].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch[k]), v)


def test_rules_round_trip_through_the_config():
  from vlp_jax import config as config_lib
  rules = sharding.rules_from_config(config_lib.default_config().sharding_rules)
  assert rules == sharding.DEFAULT_RULES
  assert sharding.rules_from_config({}) == sharding.DEFAULT_RULES
  assert sharding.rules_from_config({"batch": "data", "embed": ""}) == (
      ("batch", "data"), ("embed", None))
  with pytest.raises(ValueError, match="unknown mesh axes.*model"):
    sharding.rules_from_config({"batch": "data,model"})
