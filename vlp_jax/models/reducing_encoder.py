"""The ViT encoder with token reduction (`token_reduction.py`) inside its blocks.

Its parameter tree is exactly `layers.Transformer`'s (unrolled `block_{i}`; with
`opts.scan_layers` the stacked `layers/block`), so a checkpoint trained without
reduction runs with it (ToMe's off-the-shelf use) and back. Under `scan_layers` the
token count changes per layer, so `lax.scan` cannot run the blocks: the params are
created by the same `nn.scan` as `layers.Transformer`, and every call runs the blocks
as a Python loop over the layers, applying one block to that layer's slice of the
stacked params (a pure functional apply; remat with the configured policy through
`jax.checkpoint` per block). So with reduction, `scan_layers` keeps the param layout
but not the scan's benefits: compile time grows with depth as unrolled, and remat
saves memory as in an unrolled loop of checkpointed blocks, not as a scan does.

Known limitations: ToMe's matching metric is the keys without a key bias (this
project's attention has none; imported open_clip / HF SigLIP checkpoints drop
theirs, a no-op for softmax), so off-the-shelf matching can differ slightly from
ToMe's timm code, which uses k + b. With `prop_attn` the blocks after the first
merge pass a logits bias to `layers.Attention`, which then takes the einsum/XLA
path: no cuDNN flash attention on GPU for those blocks (GPU speed figures understate
what a fused kernel could give).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax.models import layers
from vlp_jax.models import token_reduction as tr

_EMBED = ("batch", "length", "embed")


class ReducingBlock(nn.Module):
  """`layers.Block` (self-attention only; same params) with one reduction step after
  the attention residual and before the MLP: `method` 'tome' merges `amount` tokens,
  'evit' keeps `amount` non-class tokens (0 = none). Takes and returns (x, size);
  size [B, N] float32 token sizes (None = all 1)."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  dropout: float = 0.0
  opts: layers.TransformerOptions = layers.TransformerOptions()
  method: str = "none"
  amount: int = 0
  class_token: bool = True
  prop_attn: bool = True
  fuse: bool = True

  @nn.compact
  def __call__(self, x, size=None, train: bool = False):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=not train)
    eps = self.opts.layer_norm_eps
    bias = tr.size_bias(size) if (self.prop_attn and size is not None) else None
    h, q, k = layers.Attention(self.num_heads, self.dtype, opts=self.opts, name="attn")(
        layers.layer_norm(self.dtype, "ln_attn", eps)(x), bias=bias, return_qk=True)
    x = layers.constrain(x + drop(h), _EMBED)
    if self.method == "tome" and self.amount:
      x, size = tr.tome_merge(x, size, k, self.amount, self.class_token)
      x = layers.constrain(x, _EMBED)
    elif self.method == "evit" and self.amount:
      x = tr.evit_select(x, tr.cls_attention(q, k, bias), self.amount, self.fuse)
      x = layers.constrain(x, _EMBED)
    h = layers.Mlp(self.mlp_dim, self.dtype, self.dropout, self.opts.mlp_act,
                   name="mlp")(layers.layer_norm(self.dtype, "ln_mlp", eps)(x),
                               train=train)
    return layers.constrain(x + drop(h), _EMBED), size


class _ScanBody(nn.Module):
  """The `nn.scan` body that creates the stacked params (`layers/block`) exactly as
  `layers.Transformer`'s scan does (same names, same per-layer init rngs)."""
  block: dict

  @nn.compact
  def __call__(self, x, _):
    x, _ = ReducingBlock(**self.block, name="block")(x, None, False)
    return x, None


class ReducingEncoder(nn.Module):
  """`depth` blocks with token reduction `spec`, then the final LayerNorm.

  x [B, N, W] (class token first when `class_token`) -> (x [B, N', W], size [B, N']
  float32, or None when nothing merged). N' follows `token_reduction.layer_counts`.
  With `opts.scan_layers` the blocks run as a Python loop over the stacked params
  (see the module docstring: longer compiles, loop-like remat memory).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  spec: tr.TokenReduction
  class_token: bool = True
  dtype: Any = jnp.float32
  dropout: float = 0.0
  final_norm: bool = True
  opts: layers.TransformerOptions = layers.TransformerOptions()

  def _block_kwargs(self, amount):
    return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                dropout=self.dropout, opts=self.opts, method=self.spec.method,
                amount=amount, class_token=self.class_token,
                prop_attn=self.spec.prop_attn, fuse=self.spec.fuse)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.opts.remat not in layers.REMAT_POLICIES:
      raise ValueError(f"remat '{self.opts.remat}' is not one of "
                       f"{sorted(layers.REMAT_POLICIES)}.")
    problems = tr.check(self.spec, self.depth, self.class_token)
    if problems:
      raise ValueError(" ".join(problems))
    amounts = tr.plan(self.spec, self.depth, x.shape[1], self.class_token)
    remat = self.opts.remat != "none"
    policy = layers.REMAT_POLICIES[self.opts.remat]
    size = None
    if self.opts.scan_layers:
      x, size = self._scanned(x, amounts, train, remat, policy)
    else:
      # static_argnums counts `self` as 0: `train` is argument 3.
      cls = nn.remat(ReducingBlock, policy=policy, static_argnums=(3,)) if remat \
          else ReducingBlock
      for i, amount in enumerate(amounts):
        x, size = cls(**self._block_kwargs(amount), name=f"block_{i}")(x, size, train)
    if self.final_norm:
      x = layers.layer_norm(self.dtype, "ln_final", self.opts.layer_norm_eps)(x)
    return x, size

  def _scanned(self, x, amounts, train, remat, policy):
    """The blocks over the stacked `layers/block` params, one layer at a time."""
    if self.is_initializing():
      # The params exactly as layers.Transformer creates them (its nn.scan).
      stack = nn.scan(_ScanBody, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      stack(self._block_kwargs(0), name="layers")(x, None)
    stacked = nn.meta.unbox(self.variables["params"]["layers"]["block"])
    use_rng = train and self.dropout > 0
    base = self.make_rng("dropout") if use_rng else None
    size = None
    for i, amount in enumerate(amounts):
      block = ReducingBlock(**self._block_kwargs(amount))

      def apply(params, x, size, rng, block=block):
        rngs = {"dropout": rng} if rng is not None else {}
        return block.apply({"params": params}, x, size, train, rngs=rngs)

      if remat:
        # prevent_cse left at its default (True): disabling it is only safe inside
        # a scan, and these blocks run in a Python loop.
        apply = jax.checkpoint(apply, policy=policy)
      params = jax.tree_util.tree_map(lambda p, i=i: p[i], stacked)
      rng = jax.random.fold_in(base, i) if use_rng else None
      x, size = apply(params, x, size, rng)
    return x, size

