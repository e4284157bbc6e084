"""Transformer building blocks whose parameters carry logical axis names.

Logical axes used here: `embed` (model width), `mlp` (MLP hidden), `heads` (flattened
heads x head_dim), `vocab`, `patch` (flattened patch pixels), `layers` (the stacked
layer axis of scanned blocks). Activations are constrained with `batch`, `length`,
`embed`. Attention uses 2-D `nn.Dense` projections (or one explicit fused QKV kernel)
plus `jax.nn.dot_product_attention` (3-D DenseGeneral kernels break under logical
partitioning with an active mesh, flax issue #3676).
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

Dtype = Any
default_kernel_init = nn.initializers.xavier_uniform()

# Rematerialisation policies by name (`config.model.remat`). Names of saveable
# activations: 'qkv_proj' (q, k, v projections), 'attn_out', 'mlp_hidden', 'mlp_out'.
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _cp.save_only_these_names("qkv_proj"),
    "save_qkv_proj_mlp_hidden": _cp.save_only_these_names("qkv_proj", "mlp_hidden"),
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")


# `config.model.mlp_act` -> activation. 'gelu_tanh' is flax's default (tanh
# approximation); 'gelu' the exact erf form (torch nn.GELU, open_clip's default);
# 'quick_gelu' x * sigmoid(1.702 x) (OpenAI CLIP).
MLP_ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
DEFAULT_LAYER_NORM_EPS = 1e-6  # flax's default; torch / open_clip / HF CLIP use 1e-5.


@dataclasses.dataclass(frozen=True)
class TransformerOptions:
  """Options of every block (`config.model.*`): the speed switches (scan_layers, remat,
  fused_qkv, attention_impl) do not change the function computed; `mlp_act` and
  `layer_norm_eps` do (pretrained checkpoints of other libraries need theirs)."""
  scan_layers: bool = False
  remat: str = "none"
  fused_qkv: bool = False
  attention_impl: str = "auto"
  mlp_act: str = "gelu_tanh"
  layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS


def options_from_config(model_cfg) -> TransformerOptions:
  return TransformerOptions(
      scan_layers=model_cfg.get("scan_layers", False), remat=model_cfg.get("remat", "none"),
      fused_qkv=model_cfg.get("fused_qkv", False),
      attention_impl=model_cfg.get("attention_impl", "auto"),
      mlp_act=model_cfg.get("mlp_act", "gelu_tanh"),
      layer_norm_eps=model_cfg.get("layer_norm_eps", DEFAULT_LAYER_NORM_EPS))


def dense(features: int, axes, dtype, name=None, kernel_init=default_kernel_init,
          use_bias: bool = True) -> nn.Dense:
  """A 2-D `nn.Dense` with logically partitioned kernel (in, out) and bias (out,)."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(dtype, name=None, eps: float = DEFAULT_LAYER_NORM_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def attention_implementation(impl: str, dtype, head_dim: int, has_mask: bool) -> str:
  """'xla', 'cudnn' or 'einsum' (see `einsum_attention`), decided at trace time.

  'auto' picks cuDNN flash attention on GPU for bf16/fp16 inputs with a head dim
  cuDNN supports and no explicit mask (causal masking is fine); on CPU 'einsum'
  (1.04x the whole B/16 step at batch 8, 1.11x at 32); XLA otherwise.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl '{impl}' is not one of {ATTENTION_IMPLS}.")
  if impl != "auto":
    return impl
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  ok_shape = head_dim <= 128 and head_dim % 8 == 0
  backend = jax.default_backend()
  if backend == "gpu" and half and ok_shape and not has_mask:
    return "cudnn"
  return "einsum" if backend == "cpu" else "xla"


def einsum_attention(q, k, v, mask=None, causal: bool = False, bias=None):
  """jax.nn.dot_product_attention's XLA computation on [B, L, heads, head_dim], with
  q, k, v moved to head-major [B, heads, L, head_dim] first, so that every matmul
  (forward and backward) is a plain batched matmul over (B, heads). XLA's CPU backend
  runs the backward of the token-major form's value product much slower (a 20x
  slowdown from batch 8 to 32 at ViT-B/16's 197 tokens). Same logits dtype, mask
  value and float32 softmax as jax's own. `bias` (float, broadcastable to [B, heads,
  Lq, Lk]) is added to the scaled logits (ToMe's proportional attention: log size)."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=logits_dtype)
  logits = logits * jnp.array(1.0 / math.sqrt(q.shape[-1]), logits.dtype)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if mask is not None or causal:
    keep = jnp.ones(logits.shape, bool) if mask is None else jnp.broadcast_to(
        mask, logits.shape)
    if causal:
      keep = keep & jnp.tril(jnp.ones(logits.shape[-2:], bool))
    big_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits = jnp.where(keep, logits, jnp.array(big_negative, logits.dtype))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs, v), 1, 2)


def even_length_attention(q, k, v, causal: bool, impl: str):
  """`jax.nn.dot_product_attention` on [B, L, heads, head_dim] with odd lengths padded.

  jax's cuDNN path rejects odd query/key lengths under differentiation (ViT's 197
  tokens, CLIP's 77), so one padding position is appended and excluded through the
  sequence lengths (cuDNN's padding mask, no bias); padded query rows are dropped.
  """
  lq, lk = q.shape[1], k.shape[1]
  if lq % 2 == 0 and lk % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, t.shape[1] % 2), (0, 0), (0, 0)))
  b = q.shape[0]
  out = jax.nn.dot_product_attention(
      pad(q), pad(k), pad(v), is_causal=causal, implementation=impl,
      query_seq_lengths=jnp.full((b,), lq, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), lk, jnp.int32))
  return out[:, :lq]


def _stacked_init(init, n):
  """Initialises an (in, n, out) kernel as n independent (in, out) kernels."""
  def fn(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, n)
    return jnp.stack([init(k, (shape[0], shape[2]), dtype) for k in keys], axis=1)
  return fn


class Attention(nn.Module):
  """Multi-head (self or cross) attention with q/k/v projections.

  `mask` is boolean, broadcastable to [B, heads, Lq, Lk], True = attend; `bias`
  (float, same broadcast) is added to the logits (computed by `einsum_attention`).
  With `return_qk` it returns (out, q, k), q and k as [B, L, heads, head_dim]
  (token reduction's matching metric and class-token attention). With
  `opts.fused_qkv`, self-attention uses one (embed, 3, heads) kernel (one matmul);
  its slices [:, 0], [:, 1], [:, 2] are the separate query/key/value kernels.

  With `cache_index` (an int32 scalar; None = no cache) it decodes with a KV cache
  in the 'cache' collection (`_kv_cache`); the parameters are the same.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  opts: TransformerOptions = TransformerOptions()

  def _fused_qkv(self, x, width):
    kernel = self.param("qkv_kernel", nn.with_logical_partitioning(
        _stacked_init(default_kernel_init, 3), ("embed", None, "heads")),
                        (width, 3, width), jnp.float32)
    # Biases for query and value only (see the note on the key bias below).
    bias = self.param("qv_bias", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, "heads")), (2, width), jnp.float32)
    qkv = jnp.einsum("bld,dkh->blkh", x.astype(self.dtype), kernel.astype(self.dtype))
    bias = bias.astype(self.dtype)
    return qkv[:, :, 0] + bias[0], qkv[:, :, 1], qkv[:, :, 2] + bias[1]

  @nn.compact
  def __call__(self, x, context=None, mask=None, bias=None, return_qk: bool = False,
               cache_index=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    # Decoding, a cross-attention reads its context's keys/values from the cache after
    # the first call (`context` None then).
    cross = context is not None
    cached_context = (cache_index is not None and not cross
                      and self.has_variable("cache", "context_key"))
    if cached_context:
      q = dense(width, ("embed", "heads"), self.dtype, "query")(x)
      k = v = None
    elif self.opts.fused_qkv and context is None:
      q, k, v = self._fused_qkv(x, width)
    else:
      context = x if context is None else context
      q = dense(width, ("embed", "heads"), self.dtype, "query")(x)
      # No key bias: it adds the same q.b to every logit of a query, so softmax ignores
      # it and its gradient is zero (Adam would only amplify rounding noise into it).
      k = dense(width, ("embed", "heads"), self.dtype, "key", use_bias=False)(context)
      v = dense(width, ("embed", "heads"), self.dtype, "value")(context)
    q, k, v = (None if t is None else split(checkpoint_name(t, "qkv_proj"))
               for t in (q, k, v))
    impl = attention_implementation(self.opts.attention_impl, q.dtype, head_dim,
                                    mask is not None)
    if cache_index is not None:
      k, v, mask = self._kv_cache(k, v, mask, cache_index, q.shape[1],
                                  cross=cross or cached_context)
      out = einsum_attention(q, k, v, mask, False, bias)
    elif bias is not None:
      out = einsum_attention(q, k, v, mask, self.causal, bias)
    elif impl == "cudnn" and mask is None:
      out = even_length_attention(q, k, v, self.causal, impl)
    elif impl == "einsum":
      out = einsum_attention(q, k, v, mask, self.causal)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                         implementation=impl)
    out = checkpoint_name(out.reshape(out.shape[:-2] + (width,)), "attn_out")
    out = dense(width, ("heads", "embed"), self.dtype, "out")(out)
    return (out, q, k) if return_qk else out

  def _kv_cache(self, k, v, mask, cache_index, length, cross):
    """Decoding: (keys, values, mask) over the cached sequence.

    Self-attention: this call's `length` keys/values are written into the cache
    ('cached_key'/'cached_value' [B, max_len, heads, head_dim], zeros when created:
    the first call's length is max_len) at `cache_index`, and query i attends to the
    cached keys up to position `cache_index + i` (causal). Cross-attention: the
    context's keys/values are stored on the first call ('context_key'/'context_value')
    and read from the cache when `context` is None.
    """
    if cross and k is None:  # Read.
      return (self.get_variable("cache", "context_key"),
              self.get_variable("cache", "context_value"), mask)
    if cross:  # Store.
      self.put_variable("cache", "context_key", k)
      self.put_variable("cache", "context_value", v)
      return k, v, mask
    if not self.causal:
      raise ValueError("A KV cache (cache_index) needs causal self-attention.")
    if mask is not None:
      raise ValueError("Cached self-attention takes no key mask: decoding feeds no "
                       "padding before the end of a sequence.")
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = jnp.asarray(cache_index, jnp.int32)
    at = (0, index, 0, 0)
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), at)
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), at)
    max_len = ck.value.shape[1]
    keep = jnp.arange(max_len)[None, :] <= index + jnp.arange(length)[:, None]
    return ck.value, cv.value, keep[None, None]


class Mlp(nn.Module):
  """Two-layer MLP (width -> mlp_dim -> width); `act` names an `MLP_ACTIVATIONS` entry."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  act: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x, train: bool = False):
    width = x.shape[-1]
    h = checkpoint_name(dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x),
                        "mlp_hidden")
    if self.act not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_act '{self.act}' is not one of {sorted(MLP_ACTIVATIONS)}.")
    h = MLP_ACTIVATIONS[self.act](h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return checkpoint_name(dense(width, ("mlp", "embed"), self.dtype, "fc2")(h), "mlp_out")


class Block(nn.Module):
  """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  cross_attention: bool = False
  dropout: float = 0.0
  opts: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None, train=False,
               cache_index=None):
    """`cache_index` (not None): decoding with a KV cache (`Attention`); the context
    is then needed on the first call only (its keys/values are cached)."""
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=not train)
    eps = self.opts.layer_norm_eps
    h = Attention(self.num_heads, self.dtype, causal=self.causal, opts=self.opts,
                  name="attn")(layer_norm(self.dtype, "ln_attn", eps)(x), mask=mask,
                               cache_index=cache_index)
    x = constrain(x + drop(h), ("batch", "length", "embed"))
    # context None: a text-only pass, or decoding from the cached context.
    if self.cross_attention and (context is not None or cache_index is not None):
      h = Attention(self.num_heads, self.dtype, opts=self.opts, name="cross_attn")(
          layer_norm(self.dtype, "ln_cross", eps)(x), context=context, mask=context_mask,
          cache_index=cache_index)
      x = constrain(x + drop(h), ("batch", "length", "embed"))
    h = Mlp(self.mlp_dim, self.dtype, self.dropout, self.opts.mlp_act, name="mlp")(
        layer_norm(self.dtype, "ln_mlp", eps)(x), train=train)
    return constrain(x + drop(h), ("batch", "length", "embed"))


class _ScanLayer(nn.Module):
  """One block as an `nn.scan` body: carry x, broadcast masks/context, `train` static."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  cross_attention: bool = False
  dropout: float = 0.0
  opts: TransformerOptions = TransformerOptions()
  train: bool = False

  @nn.compact
  def __call__(self, x, mask, context, context_mask, cache_index):
    block = Block(self.num_heads, self.mlp_dim, self.dtype, self.causal,
                  self.cross_attention, self.dropout, self.opts, name="block")
    return block(x, mask, context, context_mask, self.train, cache_index), None


# nn.scan's variable axes: the params stacked on a leading `layers` axis; a KV cache
# (decoding) on axis 1, so every cache array keeps the batch first (beam search
# reorders it along axis 0).
SCAN_VARIABLE_AXES = {"params": 0, "cache": 1}


class Transformer(nn.Module):
  """A stack of `depth` pre-LN blocks followed by a final LayerNorm.

  Unrolled, the blocks' params are `block_{i}`; with `opts.scan_layers` they are
  stacked under `layers/block` with a leading `layers` axis of size `depth`.
  `cache_index` (not None): decoding with a KV cache (`Block`; no remat).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  cross_attention: bool = False
  dropout: float = 0.0
  final_norm: bool = True
  opts: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, x, mask=None, context=None, context_mask=None, train=False,
               cache_index=None):
    if self.opts.remat not in REMAT_POLICIES:
      raise ValueError(f"remat '{self.opts.remat}' is not one of "
                       f"{sorted(REMAT_POLICIES)}.")
    remat = self.opts.remat != "none" and cache_index is None
    policy = REMAT_POLICIES[self.opts.remat]
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                 causal=self.causal, cross_attention=self.cross_attention,
                 dropout=self.dropout, opts=self.opts)
    if self.opts.scan_layers:
      layer = nn.remat(_ScanLayer, policy=policy, prevent_cse=False) if remat else _ScanLayer
      stack = nn.scan(layer, variable_axes=SCAN_VARIABLE_AXES,
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 4,
                      length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**block, train=train, name="layers")(x, mask, context, context_mask,
                                                        cache_index)
    else:
      # static_argnums counts `self` as 0: `train` is argument 5.
      cls = nn.remat(Block, policy=policy, static_argnums=(5,)) if remat else Block
      for i in range(self.depth):
        x = cls(**block, name=f"block_{i}")(x, mask, context, context_mask, train,
                                             cache_index)
    if self.final_norm:
      x = layer_norm(self.dtype, "ln_final", self.opts.layer_norm_eps)(x)
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
  opts: TransformerOptions = TransformerOptions()

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    probe = self.param(
        "probe", nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), (None, "length", "embed")),
        (1, self.num_queries, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0],) + probe.shape[1:])
    h = Attention(self.num_heads, self.dtype, opts=self.opts, name="attn")(
        probe, context=x, mask=mask)
    y = layer_norm(self.dtype, "ln", self.opts.layer_norm_eps)(h)
    return h + Mlp(self.mlp_dim, self.dtype, act=self.opts.mlp_act, name="mlp")(y)


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
