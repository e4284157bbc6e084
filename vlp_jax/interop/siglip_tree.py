"""SigLIP in vlp_jax terms, shared by the `hf_siglip` and `big_vision` formats.

SigLIP is a `two_tower` model with: a ViT with a learned position per patch, no class
token, a final LayerNorm and a MAP head (`image.pool='map'`) whose output is the image
embedding (`image.proj=False`); a bidirectional text transformer without padding mask
(`text.causal=False`, `text.padding_mask=False`; inputs are padded with the end token)
pooled at the last position (`text.pool='last'`), then a final LayerNorm and a linear
head with bias (`proj_bias=True`); embeddings are L2-normalised and the logits are
`exp(t) * <img, txt> + b` (`use_logit_bias=True`).

Attention key biases are dropped on import: a key bias adds q . b_k to every logit of
a query, the same for all keys, so the softmax is unchanged (exact). On export they
are zeros.

A format describes its names with a *plan*: a list of `Entry(src, path, load, save)`
(the checkpoint's array name, the vlp_jax parameter path, and the two conversions),
plus the names of the dropped key biases. `import_tree` / `export_flat` apply it.
"""
import collections
import copy
import math

import numpy as np

from vlp_jax import errors
from vlp_jax.interop import common
from vlp_jax.models import builders

Entry = collections.namedtuple("Entry", "src path load save")


def same(x):
  return x


def model_config(base, *, image, text, embed_dim, image_proj, text_proj,
                 logit_scale, logit_bias, mlp_act="gelu_tanh", layer_norm_eps=1e-6):
  """`config.model` of a SigLIP checkpoint on top of `base` (the recipe's).

  `image` / `text`: dicts of the towers' sizes; `logit_scale` / `logit_bias`: the
  checkpoint's t (log scale) and b, used as the initial values (b None: no bias, as
  big_vision's softmax two-towers such as LiT). The scale's clamp
  `logit_scale_max` is raised to ceil(exp(t)) if the checkpoint's scale is above it
  (big_vision does not clamp), so the imported model computes the same logits.
  """
  if base is None:
    from vlp_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    base = config_lib.default_config().model
  m = copy.deepcopy(base)
  m.name = "two_tower"
  m.image.update(variant="", pool="map", ln_pre=False, proj=bool(image_proj), **image)
  m.text.update(causal=False, pool="last", padding_mask=False, proj=bool(text_proj),
                prefix_conditioning=False, **text)
  m.embed_dim = int(embed_dim)
  m.proj_bias = True
  m.use_logit_bias = logit_bias is not None
  m.logit_scale_init = float(logit_scale)
  m.logit_bias_init = 0.0 if logit_bias is None else float(logit_bias)
  scale = math.exp(float(logit_scale))
  if scale > m.logit_scale_max:
    m.logit_scale_max = float(math.ceil(scale))
  m.mlp_act = mlp_act
  m.layer_norm_eps = float(layer_norm_eps)
  return m


def check_exportable(m, fmt: str):
  """Raises a ConfigError naming the first setting of `config.model` `m` that format
  `fmt`'s SigLIP cannot represent."""
  want = [("name", m.name, "two_tower"), ("image.pool", m.image.pool, "map"),
          ("image.ln_pre", m.image.get("ln_pre", False), False),
          ("text.causal", m.text.causal, False), ("text.pool", m.text.pool, "last"),
          ("text.padding_mask", m.text.get("padding_mask", True), False),
          ("text.prefix_conditioning", m.text.get("prefix_conditioning", False), False)]
  for key, have, need in want:
    if have != need:
      raise errors.ConfigError(
          f"Cannot export to {fmt}: SigLIP needs config.model.{key}={need!r}, the model "
          f"has {have!r} (only SigLIP-shaped two_tower models can be exported there).")


def import_tree(raw, plan, dropped, fmt: str):
  """Nested vlp_jax params (unrolled, unfused) from `raw` by `plan`; CheckpointError
  on a missing array, and on arrays the plan does not use (a different model)."""
  missing = [e.src for e in plan if e.src not in raw] + [d for d in dropped
                                                          if d not in raw]
  if missing:
    raise errors.CheckpointError(
        f"{fmt} checkpoint lacks {len(missing)} array(s) a SigLIP has, e.g. "
        f"{missing[:3]}; is it a SigLIP checkpoint of this format?")
  used = {e.src for e in plan} | set(dropped)
  extra = sorted(k for k in raw if k not in used)
  if extra:
    raise errors.CheckpointError(
        f"{fmt} checkpoint has {len(extra)} array(s) a SigLIP does not, e.g. "
        f"{extra[:3]}; is it a SigLIP checkpoint of this format?")
  params = {}
  for e in plan:
    node = params
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = np.asarray(e.load(np.asarray(raw[e.src])), np.float32)
  return params


def export_flat(params, plan, dropped):
  """Flat arrays named by `plan` from unrolled params; dropped key biases as zeros
  (`dropped`: name -> shape)."""
  out = {}
  for e in plan:
    node = params
    for key in e.path:
      if key not in node:
        raise errors.CheckpointError(
            f"Parameter {'/'.join(e.path)} is missing: the params do not belong to a "
            "model of the given config.model.")
      node = node[key]
    out[e.src] = np.require(e.save(np.asarray(node)), np.float32, "C")
  for name, shape in dropped.items():
    out[name] = np.zeros(shape, np.float32)
  return out


def finish_import(params, m, image_size, resize_kind):
  """Imported canonical params -> `config.model` `m`'s: image positions resized to
  `image_size` (`common.resize_grid`), text positions cut to `m.text.context_length`
  (a ConfigError if it exceeds the checkpoint's), then `m`'s param layout."""
  if image_size:
    patch = builders.tower_kwargs(m.image, None)["patch_size"]
    pos = params["img"]["pos_embedding"][0]
    params["img"]["pos_embedding"] = common.resize_grid(
        pos, common.grid_of(image_size, patch), resize_kind)[None]
  pos = params["txt"]["pos_embedding"]
  if m.text.context_length > pos.shape[1]:
    raise errors.ConfigError(f"config.model.text.context_length={m.text.context_length} "
                             f"exceeds the checkpoint's {pos.shape[1]} text positions.")
  params["txt"]["pos_embedding"] = pos[:, :m.text.context_length]
  return common.to_layout(params, m)


def canonical(params):
  """Params in any layout (scanned, fused, boxed, jax arrays) -> canonical NumPy."""
  return common.from_layout(_numpy(params))


def _numpy(tree):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(getattr(tree, "value", tree))


# An encoder block's parameters by part name: the vlp_jax path inside the block.
BLOCK_PARTS = {
    "ln1.scale": ("ln_attn", "scale"), "ln1.bias": ("ln_attn", "bias"),
    "ln2.scale": ("ln_mlp", "scale"), "ln2.bias": ("ln_mlp", "bias"),
    "q.kernel": ("attn", "query", "kernel"), "q.bias": ("attn", "query", "bias"),
    "k.kernel": ("attn", "key", "kernel"),
    "v.kernel": ("attn", "value", "kernel"), "v.bias": ("attn", "value", "bias"),
    "o.kernel": ("attn", "out", "kernel"), "o.bias": ("attn", "out", "bias"),
    "fc1.kernel": ("mlp", "fc1", "kernel"), "fc1.bias": ("mlp", "fc1", "bias"),
    "fc2.kernel": ("mlp", "fc2", "kernel"), "fc2.bias": ("mlp", "fc2", "bias"),
}


def block_entries(dst, spec):
  """Plan entries of the block at vlp_jax path `dst` (a tuple); `spec(part)` ->
  (checkpoint name, load, save) for each part of `BLOCK_PARTS`."""
  return [Entry(*spec(part)[:1], dst + path, *spec(part)[1:])
          for part, path in BLOCK_PARTS.items()]
