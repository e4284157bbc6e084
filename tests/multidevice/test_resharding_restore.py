"""A checkpoint written under one mesh restores under another and on one device."""
import jax
import numpy as np

from tests import test_train
from vlp_jax.train import checkpoint, loop, state as state_lib


def experiment(mesh, devices, workdir):
  config = test_train.tiny_config()
  config.mesh = mesh
  return config, loop.Experiment(config, workdir, devices)


def test_restore_into_other_meshes_and_one_device(tmp_path):
  workdir = str(tmp_path)
  config, exp = experiment({"data": 8, "fsdp": 1, "tensor": 1}, jax.devices(), workdir)
  state = state_lib.create_state(exp.model, exp.tx, config, exp.mesh)
  manager = checkpoint.make_manager(workdir, config)
  checkpoint.save(manager, 3, state)
  manager.wait_until_finished()
  manager.close()
  saved = jax.device_get(state)

  targets = [({"data": 2, "fsdp": 4, "tensor": 1}, jax.devices()),
             ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])]
  for mesh, devices in targets:
    config, exp = experiment(mesh, devices, workdir)
    manager = checkpoint.make_manager(workdir, config)
    restored, step = checkpoint.restore(manager, exp.abstract)
    manager.close()
    assert step == 3
    # Restored straight into the target shardings ...
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(exp.state_shardings)):
      assert leaf.sharding == target, (leaf.sharding, target)
    kernel = restored.params["txt"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert len(kernel.sharding.device_set) == len(devices)
    if len(devices) == 8:
      assert "fsdp" in str(kernel.sharding.spec)
    # ... with equal values.
    got = jax.device_get(restored)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(a, b)
