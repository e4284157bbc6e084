"""Param-tree conversions between equivalent layouts of the speed switches.

`model.scan_layers` stores a Transformer's blocks `block_0..block_{n-1}` stacked as
`layers/block` with a leading depth axis; `model.fused_qkv` stores self-attention's
query/key/value kernels as one `qkv_kernel` (in, 3, out) plus `qv_bias` (2, out).
"""
import re

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"block_(\d+)$")


def _is_unrolled(tree):
  return isinstance(tree, dict) and tree and any(_BLOCK.match(k) for k in tree)


def stack_blocks(params):
  """Unrolled params (`block_i`) -> scanned params (`layers/block`, stacked)."""
  if not isinstance(params, dict):
    return params
  if _is_unrolled(params):
    blocks = sorted((k for k in params if _BLOCK.match(k)),
                    key=lambda k: int(_BLOCK.match(k).group(1)))
    out = {k: stack_blocks(v) for k, v in params.items() if k not in blocks}
    out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *[params[k] for k in blocks])}
    return out
  return {k: stack_blocks(v) for k, v in params.items()}


def unstack_blocks(params):
  """Scanned params (`layers/block`) -> unrolled params (`block_i`)."""
  if not isinstance(params, dict):
    return params
  if set(params.get("layers", {}) or {}) == {"block"}:
    stacked = params["layers"]["block"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: unstack_blocks(v) for k, v in params.items() if k != "layers"}
    for i in range(depth):
      out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
  return {k: unstack_blocks(v) for k, v in params.items()}


def fuse_qkv(params):
  """Separate self-attention `query`/`key`/`value` -> `qkv_kernel` + `qv_bias`.

  Only self-attention modules named `attn` inside blocks are fused (cross-attention
  and attention pools keep separate projections, as the model does).
  """
  if not isinstance(params, dict):
    return params
  out = {}
  for k, v in params.items():
    if k == "attn" and isinstance(v, dict) and "query" in v and "ln_attn" in params:
      v = dict(v)
      q, key, val = v.pop("query"), v.pop("key"), v.pop("value")
      axis = q["kernel"].ndim - 1  # the (in, out) kernel may carry a leading layers axis
      v["qkv_kernel"] = jnp.stack([q["kernel"], key["kernel"], val["kernel"]], axis=axis)
      v["qv_bias"] = jnp.stack([q["bias"], val["bias"]], axis=axis - 1)
      out[k] = v
    else:
      out[k] = fuse_qkv(v)
  return out
