"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharded_train.py).

Trains a tiny CoCa (clip + caption) for 3 steps on one device and on several 8-device
meshes from the same batches, and prints how far each is from the single-device run
(in units of the tolerance rtol 1e-5 + atol 1e-6) as JSON.
"""
import json
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from tests import test_train  # pylint: disable=g-import-not-at-top
from vlp_jax import sharding
from vlp_jax.data import pipeline
from vlp_jax.train import loop, state as state_lib, step as step_lib

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def train(config, devices, batches):
  exp = loop.Experiment(config, "/unused", devices)
  mesh = exp.mesh
  state = state_lib.create_state(exp.model, exp.tx, config, mesh)
  fn = step_lib.make_train_step(exp.model, step_lib.objectives_from_config(config),
                                exp.tx, exp.schedule, exp.state_shardings,
                                sharding.batch_sharding(mesh))
  losses = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, m = fn(state, sharding.make_global_batch(b, mesh))
      losses.append(float(m["loss"]))
  return np.array(losses), jax.device_get(state.params)


def main():
  assert jax.device_count() == 8, jax.devices()
  config = test_train.tiny_config()
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batches = [next(it) for _ in range(3)]
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  ref_losses, ref_params = train(config, jax.devices()[:1], batches)
  out = {}
  for name, mesh in MESHES.items():
    config.mesh = mesh
    losses, params = train(config, jax.devices(), batches)
    # Largest |a - b| / (atol + rtol |b|) with rtol 1e-5, atol 1e-6: <= 1 passes.
    excess = lambda a, b: float(np.max(np.abs(a - b) / (1e-6 + 1e-5 * np.abs(b))))
    out[name] = {
        "loss": excess(losses, ref_losses),
        "params": max(jax.tree.leaves(jax.tree.map(excess, params, ref_params))),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
