"""On 8 simulated devices the SigLIP 2-style step equals one device: three train steps
of a tiny CoCa with the sigmoid and caption losses, local crops, the masked-image
pass and the momentum teacher (self-distillation and masked prediction switched on
from step 1) give the single-device losses, parameters and teacher."""
import math

import jax
import numpy as np
import pytest

from tests import test_train
from tests.multidevice import test_sharded_train as st


def siglip2_config():
  c = test_train.tiny_config()  # CoCa, 32 px images, patch 8 (4 x 4 patches).
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0
  c.model.masked_image_ratio = 0.5
  c.data.views = {"local": {"count": 2, "size": 16, "crop_scale": [0.05, 0.4]}}
  c.teacher.update(params=[".*"], momentum=0.5)
  c.objectives = {"siglip": 1.0, "caption": 1.0, "self_distill": 1.0,
                  "masked_prediction": 0.25}
  c.objective_cfg = {n: {"start_fraction": 0.5, "total_steps": 3}
                     for n in ("self_distill", "masked_prediction")}
  return c


@pytest.mark.slow  # ~2 CPU minutes (two compilations of the full step).
def test_train_steps_on_a_mesh_match_one_device():
  assert jax.device_count() == 8
  batches, (losses, state), (ref_losses, ref_state) = st.mesh_and_single_device(
      siglip2_config)
  assert batches[0]["views/local"].shape == (8, 2, 16, 16, 3)
  st.assert_close(losses, ref_losses)
  jax.tree.map(st.assert_close, state["params"], ref_state["params"])
  jax.tree.map(st.assert_close, state["teacher"], ref_state["teacher"])
  assert "mask_token" in state["params"]["img"]
  assert not np.allclose(ref_losses[0], ref_losses[-1])  # Training moved the params.
