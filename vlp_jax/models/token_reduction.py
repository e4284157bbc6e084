"""Visual token reduction inside the ViT: ToMe's bipartite soft matching (Bolya et
al., 2023; SimVLG's gradual merging as a schedule) and EViT's keep-and-fuse (Liang et
al., 2022). Pure functions with static shapes under jit (every count is a Python int
decided at trace time); `reducing_encoder.py` runs them inside the blocks.

Both act inside a block after the attention residual and before the MLP:

* ToMe: metric = this layer's attention keys averaged over heads, L2-normalised;
  A = even, B = odd token positions; each A token's best B match (cosine); the r A
  tokens with the highest match merge into their B match by a size-weighted average
  (sizes start at 1 and add up); the class token (index 0, in A) never merges. Output
  order: [unmerged A tokens in their original order; B tokens]. Proportional
  attention adds log(size) of each key to the logits.
* EViT: keep the ceil(rate (N - 1)) non-class tokens with the highest class-token
  attention (softmax, averaged over heads), in descending score order, after the
  class token; with `fuse` one more token = sum of a_i x_i over the others (not
  renormalised, as the reference code), an ordinary token for later layers.

Recorded choices: ToMe's metric uses the keys without a key bias (this project's
attention has none; imported open_clip / HF SigLIP checkpoints drop it), so
off-the-shelf matching can differ slightly from ToMe's timm code, which uses k + b.
Of the poolers over the reduced tokens only the ViT's 'gap' weights by token size
(`weighted_mean`); 'map', CoCa's AttentionPool and OpenClipPooler attend over them
unweighted. With `prop_attn` the attention gets a logits bias and so takes the
einsum/XLA path (no cuDNN flash attention on GPU after the first merge).
"""
import dataclasses
import math
from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp

from vlp_jax import errors

METHODS = ("none", "tome", "evit")


@dataclasses.dataclass(frozen=True)
class TokenReduction:
  """The options of `config.model.image.token_reduction` (see `from_config`)."""
  method: str = "none"
  r: int = 0              # tome: tokens merged per layer (capped at (N - cls) // 2).
  target: int = 0         # tome: final token count reached gradually (0 = use r).
  inflect: float = 0.0    # tome: ToMe's parse_r schedule shape (-1 = decreasing).
  prop_attn: bool = True  # tome: proportional attention (+ log size on the logits).
  keep_rate: float = 0.7  # evit: fraction of non-class tokens kept at each layer.
  layers: Tuple[int, ...] = (3, 6, 9)  # evit: block indices that select.
  fuse: bool = True       # evit: fuse the dropped tokens into one extra token.

  @property
  def on(self) -> bool:
    return self.method != "none"


def from_config(cfg) -> Optional[TokenReduction]:
  """`config.model.image.token_reduction` (a ConfigDict, dict or None) -> a
  TokenReduction, or None when off (method 'none' or the key is absent)."""
  if cfg is None:
    return None
  get = cfg.get
  method = get("method", "none")
  if method == "none":
    return None
  return TokenReduction(
      method=method, r=int(get("r", 0)), target=int(get("target", 0)),
      inflect=float(get("inflect", 0.0)), prop_attn=bool(get("prop_attn", True)),
      keep_rate=float(get("keep_rate", 0.7)),
      layers=tuple(int(i) for i in get("layers", (3, 6, 9))),
      fuse=bool(get("fuse", True)))


def check(spec: Optional[TokenReduction], depth: int, class_token: bool) -> List[str]:
  """Problems of `spec` for a ViT of `depth` blocks (with or without a class
  token), each a sentence naming the fix; [] if none."""
  if spec is None or not spec.on:
    return []
  key = "config.model.image.token_reduction"
  if spec.method not in METHODS:
    return [f"{key}.method={spec.method!r} is not one of {list(METHODS)}."]
  out = []
  if spec.method == "tome":
    if spec.r < 0 or spec.target < 0:
      out.append(f"{key}.r={spec.r} and .target={spec.target} must be >= 0.")
    if spec.r and spec.target:
      out.append(f"{key} sets both r={spec.r} and target={spec.target}; set one "
                 "(r: tokens merged per layer; target: final token count) and the "
                 "other to 0.")
    if not -1.0 <= spec.inflect <= 1.0:
      out.append(f"{key}.inflect={spec.inflect} must be in [-1, 1] (ToMe's schedule: "
                 "0 constant, -1 decreasing).")
  if spec.method == "evit":
    if not 0.0 < spec.keep_rate <= 1.0:
      out.append(f"{key}.keep_rate={spec.keep_rate} must be in (0, 1] (the fraction "
                 "of non-class tokens kept).")
    bad = [i for i in spec.layers if not 0 <= i < depth]
    if bad:
      out.append(f"{key}.layers={list(spec.layers)} has block indices {bad} outside "
                 f"[0, {depth}) of this {depth}-block ViT; choose indices in range.")
    if not class_token:
      out.append(f"{key}.method='evit' scores tokens by class-token attention, but "
                 "this image tower has no class token; set config.model.image.pool="
                 "'cls' (CoCa: coca_layout='open_clip') or use method='tome'.")
  return out


def has_class_token(model_cfg) -> bool:
  """Whether the family's ViT has a class token: pool 'cls' (CoCa's 'vlp_jax'
  layout builds its ViT with pool 'none', its 'open_clip' layout with 'cls')."""
  if model_cfg.name == "coca":
    return model_cfg.get("coca_layout", "vlp_jax") == "open_clip"
  return model_cfg.image.pool == "cls"


def check_config(model_cfg, depth: int) -> None:
  """ConfigError for a `config.model.image.token_reduction` that cannot work with
  `model_cfg` (its ViT has `depth` blocks); nothing when it is off."""
  cfg = model_cfg.image.get("token_reduction")
  spec = from_config(cfg)
  if spec is None:
    return
  problems = check(spec, depth, has_class_token(model_cfg))
  if float(model_cfg.get("masked_image_ratio", 0.0) or 0.0) > 0:
    problems.append(
        "config.model.image.token_reduction is on with config.model."
        "masked_image_ratio > 0, but the masked image pass compares tokens at every "
        "patch position, which merging or selection removes; set "
        "token_reduction.method='none' or masked_image_ratio=0.0.")
  if problems:
    raise errors.ConfigError(" ".join(problems))


# --- schedules and counts ---------------------------------------------------------


def parse_r(depth: int, r: int, inflect: float = 0.0) -> List[int]:
  """ToMe's schedule (`tome/utils.py` parse_r): from int(r (1 - inflect)) to
  2r - that, linear over `depth` layers (inflect 0: constant r; -1: decreasing)."""
  lo = int(r * (1.0 - inflect))
  hi = 2 * r - lo
  if depth == 1:
    return [lo]
  step = (hi - lo) / (depth - 1)
  return [int(lo + step * i) for i in range(depth)]


def tome_cap(n: int, class_token: bool) -> int:
  """Most tokens one layer can merge from n: (n - protected) // 2 (ToMe)."""
  return max(0, (n - int(class_token)) // 2)


def tome_schedule(spec: TokenReduction, depth: int, n: int,
                  class_token: bool) -> List[int]:
  """Merges per layer for `n` tokens entering (class token included), each capped at
  `tome_cap`. With `spec.target` > 0 the n - target merges are spread evenly over the
  layers (cumulative round(R (i+1) / depth); a capped layer's shortfall moves to the
  next): our reading of SimVLG's "gradual merging" (its exact schedule is
  unconfirmed). Otherwise ToMe's `parse_r(depth, r, inflect)`."""
  out = []
  if spec.target > 0:
    total = max(0, n - spec.target)
    done = 0
    for i in range(depth):
      want = int(round(total * (i + 1) / depth)) - done
      r = min(max(want, 0), tome_cap(n, class_token))
      out.append(r)
      done += r
      n -= r
    return out
  for r in parse_r(depth, spec.r, spec.inflect):
    r = min(max(r, 0), tome_cap(n, class_token))
    out.append(r)
    n -= r
  return out


def evit_keep(n: int, keep_rate: float) -> int:
  """Non-class tokens EViT keeps of n tokens (class token included):
  ceil(keep_rate (n - 1)), as the reference code (float product, then ceil)."""
  return math.ceil(keep_rate * (n - 1))


def plan(spec: Optional[TokenReduction], depth: int, n: int,
         class_token: bool) -> List[int]:
  """Per layer, the reduction amount: ToMe merges r, or EViT's kept count k (0 = no
  selection at that layer: not listed, or k = n - 1 keeps everything). `n`: tokens
  entering the encoder, class token included."""
  if spec is None or not spec.on:
    return [0] * depth
  if spec.method == "tome":
    return tome_schedule(spec, depth, n, class_token)
  out = []
  for i in range(depth):
    k = evit_keep(n, spec.keep_rate) if (i in spec.layers and class_token) else n - 1
    if k >= n - 1:
      out.append(0)
      continue
    out.append(k)
    n = 1 + k + int(spec.fuse)
  return out


def layer_counts(spec: Optional[TokenReduction], depth: int, n: int,
                 class_token: bool) -> List[Tuple[int, int]]:
  """Per layer (tokens its attention sees, tokens its MLP sees = tokens leaving it),
  for `n` tokens entering (class token included)."""
  out = []
  for amount in plan(spec, depth, n, class_token):
    if not amount:
      after = n
    elif spec.method == "tome":
      after = n - amount
    else:
      after = 1 + amount + int(spec.fuse)
    out.append((n, after))
    n = after
  return out


def output_count(spec: Optional[TokenReduction], depth: int, n: int,
                 class_token: bool) -> int:
  """Tokens leaving the encoder for `n` entering (class token included)."""
  counts = layer_counts(spec, depth, n, class_token)
  return counts[-1][1] if counts else n


# --- ToMe -----------------------------------------------------------------------


def _gather(x, idx):
  """x [B, N, ...], idx [B, K] -> [B, K, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def bipartite_matching(metric, r: int, class_token: bool):
  """ToMe's bipartite soft matching. metric [B, N, C] (already head-averaged keys);
  returns (unm_idx [B, nA - r], src_idx [B, r], dst_idx [B, r]) as indices into A
  (even positions), A and B (odd positions): the unmerged A tokens (in original order
  when there is a class token, as ToMe), the merged A tokens and their B matches."""
  metric = jax.lax.stop_gradient(metric.astype(jnp.float32))
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum("bic,bjc->bij", a, b)
  if class_token:
    scores = scores.at[:, 0, :].set(-jnp.inf)
  node_max = jnp.max(scores, axis=-1)
  node_idx = jnp.argmax(scores, axis=-1)
  order = jnp.argsort(-node_max, axis=-1)
  src_idx, unm_idx = order[:, :r], order[:, r:]
  if class_token:
    unm_idx = jnp.sort(unm_idx, axis=-1)
  dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=-1)
  return unm_idx, src_idx, dst_idx


def merge_sum(x, matching):
  """Applies a matching to x [B, N, ...]: [unmerged A; B + scatter-sum of the merged
  A tokens into their matches] -> [B, N - r, ...]."""
  unm_idx, src_idx, dst_idx = matching
  a, b = x[:, ::2], x[:, 1::2]
  unm, src = _gather(a, unm_idx), _gather(a, src_idx)
  b = jax.vmap(lambda d, i, s: d.at[i].add(s))(b, dst_idx, src)
  return jnp.concatenate([unm, b], axis=1)


def merge_wavg(x, size, matching):
  """Size-weighted merge: x [B, N, W], size [B, N] (None = ones) -> (x', size'),
  x' = scatter-sum(x s) / scatter-sum(s), size' = scatter-sum(s)."""
  if size is None:
    size = jnp.ones(x.shape[:2], jnp.float32)
  weighted = merge_sum(x.astype(jnp.float32) * size[..., None], matching)
  size = merge_sum(size, matching)
  return (weighted / size[..., None]).astype(x.dtype), size


def tome_merge(x, size, keys, r: int, class_token: bool):
  """One layer's merge: keys [B, N, heads, head_dim] (this layer's attention keys)
  -> (x [B, N - r, W], size [B, N - r]); r = 0 returns the inputs."""
  if r <= 0:
    return x, size
  r = min(r, tome_cap(x.shape[1], class_token))
  matching = bipartite_matching(jnp.mean(keys, axis=2), r, class_token)
  return merge_wavg(x, size, matching)


def size_bias(size):
  """Proportional attention's additive logits bias: log(size) per key, [B, 1, 1, N]."""
  return jnp.log(size)[:, None, None, :]


# --- EViT -----------------------------------------------------------------------


def cls_attention(q, k, bias=None):
  """Softmax attention of the class token (query 0) to every non-class token,
  averaged over heads: q, k [B, N, heads, head_dim] -> [B, N - 1] (float32)."""
  q0 = q[:, 0].astype(jnp.float32)
  logits = jnp.einsum("bhd,bnhd->bhn", q0, k.astype(jnp.float32)) / math.sqrt(
      q.shape[-1])
  if bias is not None:
    logits = logits + bias[:, :, 0].astype(jnp.float32)
  return jnp.mean(jax.nn.softmax(logits, axis=-1)[:, :, 1:], axis=1)


def evit_select(x, attn, keep: int, fuse: bool):
  """x [B, N, W] (after the attention residual), attn [B, N - 1] (`cls_attention`)
  -> [B, 1 + keep (+ 1), W]: class token, the `keep` most attended tokens (highest
  first) and, with `fuse`, sum of a_i x_i over the rest (weights not renormalised)."""
  others = x[:, 1:]
  _, idx = jax.lax.top_k(attn, keep)
  parts = [x[:, :1], _gather(others, idx)]
  if fuse:
    dropped = 1.0 - jnp.sum(jax.nn.one_hot(idx, attn.shape[1], dtype=attn.dtype), 1)
    weights = attn * dropped
    fused = jnp.einsum("bn,bnw->bw", weights, others.astype(jnp.float32))
    parts.append(fused[:, None].astype(x.dtype))
  return jnp.concatenate(parts, axis=1)


def weighted_mean(x, size):
  """Size-weighted mean over tokens (ToMe's MAE pooling): x [B, N, W], size [B, N]
  (None: the plain mean)."""
  if size is None:
    return jnp.mean(x, axis=1)
  s = size.astype(jnp.float32)[..., None]
  return (jnp.sum(x.astype(jnp.float32) * s, axis=1) / jnp.sum(s, axis=1)).astype(
      x.dtype)
