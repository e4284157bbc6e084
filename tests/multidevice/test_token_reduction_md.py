"""On 8 simulated devices (data, fsdp and tensor axes at once), a ViT whose blocks
merge tokens (ToMe, scanned with remat) or select them (EViT) gives one device's
outputs and gradients with sharded params and batch; `slow`: whole CLIP train steps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from tests.multidevice import test_sharded_train as sharded
from vlp_jax import sharding
from vlp_jax.models import layers, vit
from vlp_jax.models import token_reduction as tr


# ToMe (scanned) in `make test`; EViT in the slow set (each compiles a mesh gradient).
@pytest.mark.parametrize("spec,scan", [
    (tr.TokenReduction("tome", r=16), True),
    pytest.param(tr.TokenReduction("evit", keep_rate=0.5, layers=(0,)), False,
                 marks=pytest.mark.slow)],
                         ids=["tome", "evit"])
def test_vit_forward_and_gradient_on_a_mesh(spec, scan):
  assert jax.device_count() == 8
  model = vit.ViT(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4,
                  token_reduction=spec,
                  opts=layers.TransformerOptions(scan_layers=scan,
                                                 remat="full" if scan else "none"))
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  boxed = jax.jit(model.init)(jax.random.PRNGKey(1), images)
  params = nn.meta.unbox(boxed)

  def loss(p, x):
    pooled, tokens = model.apply(p, x)
    u = jnp.sin(jnp.arange(32.0))  # A fixed direction: gradients of size ~1.
    return jnp.sum(pooled * u) + jnp.sum(jnp.mean(tokens, 1) * u)
  fn = jax.jit(jax.value_and_grad(loss))
  want = fn(params, images)
  mesh = sharding.make_mesh(sharded.MESHES["data2_fsdp2_tensor2"], jax.devices())
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p_sh = jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules))
    x_sh = jax.device_put(images, sharding.batch_sharding(mesh, rules))
    got = fn(p_sh, x_sh)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  # Sums over tokens and batch in another order: tolerance on each leaf's scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), got[1], want[1])


def tome_config():
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.objectives = {"clip": 1.0}
  c.model.image.update(depth=2, patch_size=4)  # 64 patches
  c.model.update(scan_layers=True, remat="full")
  c.model.image.token_reduction.update(method="tome", r=16)
  return c


def evit_config():
  c = tome_config()
  c.model.update(scan_layers=False, remat="none")
  c.model.image.token_reduction.update(method="evit", keep_rate=0.5, layers=(0,))
  return c


@pytest.mark.slow  # ~1 CPU minute each (two train-step compilations).
@pytest.mark.parametrize("config_fn", [tome_config, evit_config], ids=["tome", "evit"])
def test_token_reduction_on_a_mesh_matches_single_device(config_fn):
  assert jax.device_count() == 8
  _, (losses, params), (ref_losses, ref_params) = sharded.mesh_and_single_device(
      config_fn)
  sharded.assert_close(losses, ref_losses)
  jax.tree.map(sharded.assert_close, params, ref_params)
