"""Helpers shared by the weight-interop tests (tests/test_interop_*.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def flat(tree):
  """{'a/b/c': leaf} of a nested params tree."""
  return traverse_util.flatten_dict(tree, sep="/")


def jitted_forward(make_fn):
  """(cfg, params, ref) -> make_fn(cfg)(params, images, tokens) on a fixture's NCHW
  `images` (given NHWC) and `tokens` (int32); one jitted function per model config."""
  cache = {}

  def run(cfg, params, ref):
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    if key not in cache:
      cache[key] = jax.jit(make_fn(cfg))
    images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return cache[key](params, images, jnp.asarray(ref["tokens"], jnp.int32))
  return run


def param_shapes(model, image_size: int, text_length: int):
  """Flat name -> shape of `model`'s freshly initialised params (nothing computed)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          {"image": jnp.zeros((1, image_size, image_size, 3)),
                           "text": jnp.zeros((1, text_length), jnp.int32)})["params"]
  return {k: v.value.shape if hasattr(v, "value") else v.shape
          for k, v in flat(shapes).items()}


def assert_exported_array(name, got, want):
  """An exported torch-layout array equals the original, but for attention key biases:
  import drops them (exact: a per-query constant under softmax), export writes zeros."""
  if name.endswith("k_proj.bias"):
    np.testing.assert_array_equal(got, 0, err_msg=name)
  elif name.endswith("in_proj_bias"):  # Fused [q; k; v].
    w = got.shape[0] // 3
    np.testing.assert_array_equal(got[:w], want[:w], err_msg=name)
    np.testing.assert_array_equal(got[w:2 * w], 0, err_msg=name)
    np.testing.assert_array_equal(got[2 * w:], want[2 * w:], err_msg=name)
  else:
    np.testing.assert_array_equal(got, want, err_msg=name)
