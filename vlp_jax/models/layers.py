"""Transformer building blocks whose parameters carry logical axis names.

Logical axes used here: `embed` (model width), `mlp` (MLP hidden), `heads` (flattened
heads x head_dim), `vocab`, `patch` (flattened patch pixels). Activations are
constrained with `batch`, `length`, `embed`. Attention uses 2-D `nn.Dense` projections
plus `jax.nn.dot_product_attention` (3-D DenseGeneral kernels break under logical
partitioning with an active mesh, flax issue #3676).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes, dtype, name=None, kernel_init=default_kernel_init,
          use_bias: bool = True) -> nn.Dense:
  """A 2-D `nn.Dense` with logically partitioned kernel (in, out) and bias (out,)."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(dtype, name=None) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class Attention(nn.Module):
  """Multi-head (self or cross) attention with separate q/k/v projections.

  `mask` is boolean, broadcastable to [B, heads, Lq, Lk], True = attend.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    context = x if context is None else context
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense(width, ("embed", "heads"), self.dtype, "query")(x))
    # No key bias: it adds the same q.b to every logit of a query, so softmax ignores
    # it and its gradient is zero (Adam would only amplify rounding noise into it).
    k = split(dense(width, ("embed", "heads"), self.dtype, "key", use_bias=False)(context))
    v = split(dense(width, ("embed", "heads"), self.dtype, "value")(context))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
    out = out.reshape(out.shape[:-2] + (width,))
    return dense(width, ("heads", "embed"), self.dtype, "out")(out)


class Mlp(nn.Module):
  """Two-layer GELU MLP (width -> mlp_dim -> width)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = x.shape[-1]
    h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.gelu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return dense(width, ("mlp", "embed"), self.dtype, "fc2")(h)


class Block(nn.Module):
  """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  cross_attention: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None, train=False):
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=not train)
    h = Attention(self.num_heads, self.dtype, causal=self.causal, name="attn")(
        layer_norm(self.dtype, "ln_attn")(x), mask=mask)
    x = constrain(x + drop(h), ("batch", "length", "embed"))
    if self.cross_attention:
      h = Attention(self.num_heads, self.dtype, name="cross_attn")(
          layer_norm(self.dtype, "ln_cross")(x), context=context, mask=context_mask)
      x = constrain(x + drop(h), ("batch", "length", "embed"))
    h = Mlp(self.mlp_dim, self.dtype, self.dropout, name="mlp")(
        layer_norm(self.dtype, "ln_mlp")(x), train=train)
    return constrain(x + drop(h), ("batch", "length", "embed"))


class Transformer(nn.Module):
  """A stack of `depth` pre-LN blocks followed by a final LayerNorm."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  cross_attention: bool = False
  dropout: float = 0.0
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None, train=False):
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, self.dtype, self.causal,
                self.cross_attention, self.dropout, name=f"block_{i}")(
                    x, mask=mask, context=context, context_mask=context_mask,
                    train=train)
    if self.final_norm:
      x = layer_norm(self.dtype, "ln_final")(x)
    return x


class AttentionPool(nn.Module):
  """Multihead attention pooling (MAP) with `num_queries` learned probes.

  As big_vision's MAPHead: probes cross-attend to the tokens, then a residual MLP.
  Returns [B, num_queries, W].
  """
  num_heads: int
  mlp_dim: int
  num_queries: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    probe = self.param(
        "probe", nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, "length", "embed")),
        (1, self.num_queries, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0],) + probe.shape[1:])
    h = Attention(self.num_heads, self.dtype, name="attn")(probe, context=x, mask=mask)
    y = layer_norm(self.dtype, "ln")(h)
    return h + Mlp(self.mlp_dim, self.dtype, name="mlp")(y)


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
