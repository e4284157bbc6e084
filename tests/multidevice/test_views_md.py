"""On 8 simulated devices, view keys ('views/*', 'view_boxes/*', 'text_views/*') are
sharded along the batch axis like 'image', and an objective declaring them gets the
single-device gradient, with and without accumulation (tests/test_views.py has the
single-device checks)."""
import jax
import numpy as np

from tests import datagen, test_views
from vlp_jax import sharding
from vlp_jax.data import pipeline
from vlp_jax.objectives import combine
from vlp_jax.train import step as step_lib


def test_view_batches_shard_like_images_and_give_the_same_gradient(tmp_path):
  source = "jsonl:" + datagen.write_jsonl(str(tmp_path), 20, "j a b c")
  config = test_views.small_config(source, batch_size=16)
  it = iter(pipeline.train_dataset(config, test_views.TOKENIZER))
  host, _ = pipeline.split_bad_counts(next(it))
  probe = combine.from_registry("test_views_probe")
  params = {"w": np.ones((3,), np.float32)}
  rng = jax.random.PRNGKey(0)
  results = []
  for mesh_cfg, devices in (({"data": 1}, jax.devices()[:1]),
                            ({"data": 4, "fsdp": 2}, jax.devices())):
    mesh = sharding.make_mesh(mesh_cfg, devices)
    batch = sharding.make_global_batch(host, mesh)
    for key, value in batch.items():
      assert value.shape == host[key].shape, key
      shard = value.addressable_shards[0].data.shape
      assert shard == (16 // len(devices),) + host[key].shape[1:], key
    for accum in (1, 2):
      fn = jax.jit(lambda p, b, a=accum: step_lib.gradients(
          p, test_views._Model(), [probe], b, rng, accum_steps=a))  # pylint: disable=protected-access
      results.append(fn(params, batch))
  for grads, metrics in results[1:]:
    np.testing.assert_allclose(grads["w"], results[0][0]["w"], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
