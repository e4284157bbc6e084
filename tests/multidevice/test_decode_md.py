"""KV-cached decoding on 8 simulated devices (batch split over data x fsdp, as
train/predict.py's `generate` runs under the evaluators' mesh) equals one device."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_decode
from vlp_jax import sharding
from vlp_jax.train import predict

BOS, EOS, PAD = test_decode.BOS, test_decode.EOS, test_decode.PAD


@pytest.mark.slow  # ~40 s of CPU: in the slow multidevice set.
def test_decoding_sharded_over_the_batch_equals_one_device():
  assert jax.device_count() == 8
  s = test_decode.setup_for("vlp_jax_scan_fused")
  tokenizer = types.SimpleNamespace(tokenize=None, decode=None, bos_id=BOS,
                                    eos_id=EOS, pad_id=PAD)
  params = test_decode.with_end_bias(s.params, 2.0)
  images = jnp.concatenate([s.images, s.images[::-1]])  # 8 images.
  runs = [dict(method="greedy"), dict(method="beam", beam_size=2, length_penalty=0.6),
          dict(method="sample", top_p=0.8, temperature=1.5, seed=4)]
  one = predict.generate_fn(s.model, tokenizer, test_decode.L)
  want = [np.asarray(one(params, images, **kw)) for kw in runs]
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})  # Auto axes.
  sharded = predict.generate_fn(s.model, tokenizer, test_decode.L,
                                jax.sharding.PartitionSpec())
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh):
    x = jax.device_put(images, batch)
    for kw, expected in zip(runs, want):
      got = sharded(params, x, **kw)
      assert got.sharding.is_fully_replicated
      np.testing.assert_array_equal(np.asarray(got), expected)


def test_decoding_splits_the_batch_as_the_logical_rules_say():
  """The batch axes follow the active logical-axis rules (the run's
  config.sharding_rules: evaluation and tools/caption.py enter them), else
  sharding.DEFAULT_RULES."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from vlp_jax.models import kv_decode  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with jax.set_mesh(mesh):
    assert kv_decode.batch_axes() == ("data", "fsdp")
    with nn.logical_axis_rules(sharding.rules_from_config({"batch": "data"})):
      assert kv_decode.batch_axes() == ("data",)
