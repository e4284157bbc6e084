"""M3AE on 8 simulated devices: a sharded mesh gives one device's losses and
parameters (the shared mask is drawn from the replicated step key, so every shard
masks the same positions whatever the layout)."""
import jax
import numpy as np
import pytest

from tests.multidevice import test_sharded_train as sharded
from vlp_jax import config as config_lib


def m3ae_config():
  c = config_lib.default_config()
  c.batch_size = 16
  c.log_every = 1
  c.model.name = "m3ae"
  c.model.image.update(variant="", width=32, depth=1, mlp_dim=64, num_heads=2,
                       patch_size=16)
  c.model.text.update(vocab_size=48, context_length=24)
  c.model.m3ae.update(decoder_width=16, decoder_depth=1, decoder_heads=2,
                      decoder_mlp_dim=32)
  c.data.update(source="shapes", image_size=32, tokenizer="words:shapes")
  c.objectives = {"m3ae_image": 1.0, "m3ae_text": 0.5}
  c.optim.update(lr=1e-3, warmup_steps=1)
  c.evals = {}
  return c


@pytest.mark.slow  # ~70 s of CPU: two compilations of the step (1 and 8 devices).
def test_m3ae_mesh_matches_single_device():
  assert jax.device_count() == 8
  _, (losses, params), (ref_losses, ref_params) = sharded.mesh_and_single_device(
      m3ae_config)
  sharded.assert_close(losses, ref_losses)
  jax.tree.map(sharded.assert_close, params, ref_params)
  assert not np.allclose(ref_losses[0], ref_losses[-1])
