"""Hugging Face `SiglipModel` weights (`model.safetensors` + `config.json`) <-> vlp_jax.

`read(path)` takes the model folder or its weights file (.safetensors, or a
`pytorch_model.bin` torch archive); a `config.json` beside it (`raw.meta`) supplies
what the arrays cannot tell (attention heads, MLP activation, LayerNorm epsilon).
Without one, heads come from the `image_heads` / `text_heads` options, else from
the widths of the published SigLIPs, else width // 64. Export writes
`model.safetensors` and a `config.json` that `SiglipModel.from_pretrained(folder)`
loads. No torch needed for .safetensors. See `siglip_tree` for the architecture
mapping (MAP head, text head, attention key biases).
"""
import json
import os
import sys

import numpy as np

from vlp_jax import errors, interop
from vlp_jax.interop import common, siglip_tree
from vlp_jax.interop.siglip_tree import Entry, same
from vlp_jax.models import builders

NAME = "hf_siglip"
V, T = "vision_model", "text_model"
# Published SigLIP widths -> attention heads (B, L, So400m, g-opt), for files
# without their config.json.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}
# HF `hidden_act` <-> `config.model.mlp_act`.
ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
        "quick_gelu": "quick_gelu"}
ACT_NAMES = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
IN_PROJ = f"{V}.head.attention.in_proj"
_IGNORED = (f"{T}.embeddings.position_ids", f"{V}.embeddings.position_ids")


def _weights_file(path):
  if path and os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise errors.DataPathError(f"{path} has no model.safetensors or pytorch_model.bin; "
                               "give the SigLIP model folder or its weights file.")
  return common.check_file(path, "HF SiglipModel weights")


def read(path):
  """Flat arrays (`common.Arrays`; the config.json beside them is `.meta`)."""
  weights = _weights_file(path)
  raw = common.Arrays({k: v for k, v in common.read_any(weights).items()
                       if k not in _IGNORED})
  config = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")
  if os.path.isfile(config):
    with open(config) as f:
      raw.meta = json.load(f)
  return raw


def write(raw, path, export_config=None):
  """`model.safetensors` in folder `path` (or the .safetensors file `path`) and, with
  `export_config`, config.json beside it."""
  if path.endswith(".safetensors"):
    directory, weights = os.path.dirname(os.path.abspath(path)), path
  else:
    directory, weights = path, os.path.join(path, "model.safetensors")
  common.write_safetensors(dict(raw), weights, {"format": "pt"})
  if export_config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(export_config, f, indent=2, sort_keys=True)


def _section(raw, tower):
  return (getattr(raw, "meta", None) or {}).get(f"{tower}_config", {}) or {}


def native_image_size(raw) -> int:
  """The image side of the checkpoint's position grid."""
  patch = common.take(raw, f"{V}.embeddings.patch_embedding.weight", NAME).shape[-1]
  n = common.take(raw, f"{V}.embeddings.position_embedding.weight", NAME).shape[0]
  return int(round(n ** 0.5)) * int(patch)


def _heads(raw, tower, width, given=0, head_dim=None):
  heads = given or _section(raw, tower).get("num_attention_heads")
  if not heads:
    heads = (width // head_dim if head_dim else KNOWN_HEADS.get(width)) or (
        width // 64 if width % 64 == 0 else None)
  if not heads or width % heads:
    raise errors.CheckpointError(
        f"{NAME}: cannot tell the attention heads of the width-{width} {tower} tower "
        "from the arrays; put the model's config.json beside the weights (or pass "
        f"{'image' if tower == 'vision' else tower}_heads).")
  return int(heads)


def _one(raw, field, default, what):
  values = {_section(raw, t).get(field, default) for t in ("vision", "text")}
  if len(values) != 1:
    raise errors.CheckpointError(
        f"{NAME}: the towers' {field} differ {sorted(values)}; vlp_jax has one "
        f"config.model.{what} for both.")
  return values.pop()


def model_config(raw, base_model_cfg=None, image_heads=0, text_heads=0,
                 head_dim=None):
  """`config.model` of the checkpoint on `base_model_cfg` (None: the defaults): sizes
  from the arrays, heads / activation / eps from config.json (`raw.meta`)."""
  take = lambda name: common.take(raw, name, NAME)
  conv = take(f"{V}.embeddings.patch_embedding.weight")
  width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
  if channels != 3:
    raise errors.CheckpointError(f"{NAME}: the patch embedding takes {channels} "
                                 "channels; vlp_jax's ViT takes RGB (3).")
  tok = take(f"{T}.embeddings.token_embedding.weight")
  head = take(f"{T}.head.weight")
  if head.shape[0] != width:
    raise errors.CheckpointError(
        f"{NAME}: the text head gives {head.shape[0]}-d embeddings but the image tower "
        f"{width}-d ones (SigLIP's image embedding is its MAP head output).")
  image = dict(width=int(width), patch_size=int(patch),
               depth=common.count_blocks(raw, f"{V}.encoder.layers."),
               mlp_dim=int(take(f"{V}.encoder.layers.0.mlp.fc1.weight").shape[0]),
               num_heads=_heads(raw, "vision", width, image_heads, head_dim))
  text = dict(vocab_size=int(tok.shape[0]), width=int(tok.shape[1]),
              depth=common.count_blocks(raw, f"{T}.encoder.layers."),
              mlp_dim=int(take(f"{T}.encoder.layers.0.mlp.fc1.weight").shape[0]),
              num_heads=_heads(raw, "text", tok.shape[1], text_heads, head_dim),
              context_length=int(take(f"{T}.embeddings.position_embedding.weight").shape[0]))
  act = _one(raw, "hidden_act", "gelu_pytorch_tanh", "mlp_act")
  if act not in ACTS:
    raise errors.CheckpointError(f"{NAME}: hidden_act {act!r} is not one of "
                                 f"{sorted(ACTS)}.")
  return siglip_tree.model_config(
      base_model_cfg, image=image, text=text, embed_dim=width, image_proj=False,
      text_proj=True, logit_scale=take("logit_scale").reshape(()),
      logit_bias=take("logit_bias").reshape(()), mlp_act=ACTS[act],
      layer_norm_eps=float(_one(raw, "layer_norm_eps", 1e-6, "layer_norm_eps")))


def _t(x):
  return x.T


def _block_spec(prefix):
  def spec(part):
    name, field = part.split(".")
    torch_name = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q": "self_attn.q_proj",
                  "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}[name]
    if field == "kernel":
      return f"{prefix}.{torch_name}.weight", _t, _t
    return f"{prefix}.{torch_name}.{'weight' if field == 'scale' else 'bias'}", same, same
  return spec


def _norm(src, dst):
  return [Entry(f"{src}.weight", dst + ("scale",), same, same),
          Entry(f"{src}.bias", dst + ("bias",), same, same)]


def _linear(src, dst):
  return [Entry(f"{src}.weight", dst + ("kernel",), _t, _t),
          Entry(f"{src}.bias", dst + ("bias",), same, same)]


def plan(m):
  """(entries, dropped key-bias name -> shape) for `config.model` `m`."""
  img = builders.tower_kwargs(m.image, None)
  w, tw, patch = img["width"], m.text.width, img["patch_size"]
  to_kernel = lambda c: c.transpose(2, 3, 1, 0).reshape(-1, c.shape[0])
  to_conv = lambda k: k.reshape(patch, patch, -1, k.shape[1]).transpose(3, 2, 0, 1)
  scalar = (lambda x: x.reshape(()), lambda x: x.reshape(1))
  entries = [
      Entry(f"{V}.embeddings.patch_embedding.weight", ("img", "embedding", "kernel"),
            to_kernel, to_conv),
      Entry(f"{V}.embeddings.patch_embedding.bias", ("img", "embedding", "bias"),
            same, same),
      Entry(f"{V}.embeddings.position_embedding.weight", ("img", "pos_embedding"),
            lambda x: x[None], lambda x: x[0])]
  dropped = {}
  for i in range(img["depth"]):
    entries += siglip_tree.block_entries(("img", "encoder", f"block_{i}"),
                                         _block_spec(f"{V}.encoder.layers.{i}"))
    dropped[f"{V}.encoder.layers.{i}.self_attn.k_proj.bias"] = (w,)
  entries += _norm(f"{V}.post_layernorm", ("img", "encoder", "ln_final"))
  mh = ("img", "map_head")
  entries += [Entry(f"{V}.head.probe", mh + ("probe",), same, same)]
  entries += _linear(f"{IN_PROJ}_q", mh + ("attn", "query"))
  entries += [Entry(f"{IN_PROJ}_k.weight", mh + ("attn", "key", "kernel"), _t, _t)]
  entries += _linear(f"{IN_PROJ}_v", mh + ("attn", "value"))
  dropped[f"{IN_PROJ}_k.bias"] = (w,)
  entries += _linear(f"{V}.head.attention.out_proj", mh + ("attn", "out"))
  entries += _norm(f"{V}.head.layernorm", mh + ("ln",))
  entries += _linear(f"{V}.head.mlp.fc1", mh + ("mlp", "fc1"))
  entries += _linear(f"{V}.head.mlp.fc2", mh + ("mlp", "fc2"))
  entries += [
      Entry(f"{T}.embeddings.token_embedding.weight", ("txt", "token_embedding",
                                                       "embedding"), same, same),
      Entry(f"{T}.embeddings.position_embedding.weight", ("txt", "pos_embedding"),
            lambda x: x[None], lambda x: x[0])]
  for i in range(m.text.depth):
    entries += siglip_tree.block_entries(("txt", "encoder", f"block_{i}"),
                                         _block_spec(f"{T}.encoder.layers.{i}"))
    dropped[f"{T}.encoder.layers.{i}.self_attn.k_proj.bias"] = (tw,)
  entries += _norm(f"{T}.final_layer_norm", ("txt", "encoder", "ln_final"))
  entries += _linear(f"{T}.head", ("txt_proj", "proj"))
  entries += [Entry("logit_scale", ("scale", "logit_scale"), *scalar),
              Entry("logit_bias", ("scale", "logit_bias"), *scalar)]
  return entries, dropped


def _split_in_proj(raw):
  """torch MultiheadAttention's stacked in_proj (q; k; v) -> per-projection names."""
  raw = dict(raw)
  for kind in ("weight", "bias"):
    name = f"{IN_PROJ}_{kind}"
    if name in raw:
      for part, value in zip("qkv", np.split(np.asarray(raw.pop(name)), 3)):
        raw[f"{IN_PROJ}_{part}.{kind}"] = value
  return raw


def _merge_in_proj(flat):
  for kind in ("weight", "bias"):
    flat[f"{IN_PROJ}_{kind}"] = np.concatenate(
        [flat.pop(f"{IN_PROJ}_{part}.{kind}") for part in "qkv"])
  return flat


def to_params(raw, model_cfg, image_size=None):
  """The two_tower params of `model_cfg` (from `model_config`); image positions are
  resized as HF's `interpolate_pos_encoding` does (torch bicubic without antialias:
  `common.resize_grid` kind 'torch_bicubic') when `image_size` gives another patch
  grid than the checkpoint's."""
  entries, dropped = plan(model_cfg)
  params = siglip_tree.import_tree(_split_in_proj(raw), entries, dropped, NAME)
  return siglip_tree.finish_import(params, model_cfg, image_size, "torch_bicubic")


def from_params(params, model_cfg):
  """HF SigLIP arrays of two_tower `params` (any param layout).

  A model without text projection gets an identity head; one without projection
  bias zero biases (both compute the same). A model with an image projection cannot
  be exported (HF's SigLIP has none): a ConfigError."""
  m = model_cfg
  siglip_tree.check_exportable(m, NAME)
  if not m.use_logit_bias:
    raise errors.ConfigError(f"Cannot export to {NAME}: SigLIP needs "
                             "config.model.use_logit_bias=True.")
  if m.image.get("proj", True):
    raise errors.ConfigError(
        f"Cannot export to {NAME}: HF's SiglipModel has no image projection, the model "
        "has one (config.model.image.proj=True); export to 'big_vision' instead.")
  params = siglip_tree.canonical(params)
  proj = params.setdefault("txt_proj", {}).setdefault("proj", {})
  if not m.text.get("proj", True):
    proj["kernel"] = np.eye(m.text.width, m.embed_dim, dtype=np.float32)
  proj.setdefault("bias", np.zeros((m.embed_dim,), np.float32))
  entries, dropped = plan(m)
  return _merge_in_proj(siglip_tree.export_flat(params, entries, dropped))


def export_config(model_cfg, image_size: int) -> dict:
  """The SiglipConfig (config.json) of the exported arrays."""
  m = model_cfg
  img = builders.tower_kwargs(m.image, None)
  act = ACT_NAMES[m.get("mlp_act", "gelu_tanh")]
  eps = float(m.get("layer_norm_eps", 1e-6))
  return {
      "architectures": ["SiglipModel"], "model_type": "siglip",
      "vision_config": dict(
          model_type="siglip_vision_model", hidden_size=img["width"],
          intermediate_size=img["mlp_dim"], num_hidden_layers=img["depth"],
          num_attention_heads=img["num_heads"], patch_size=img["patch_size"],
          image_size=int(image_size), num_channels=3, hidden_act=act,
          layer_norm_eps=eps),
      "text_config": dict(
          model_type="siglip_text_model", vocab_size=m.text.vocab_size,
          hidden_size=m.text.width, intermediate_size=m.text.mlp_dim,
          num_hidden_layers=m.text.depth, num_attention_heads=m.text.num_heads,
          max_position_embeddings=m.text.context_length, projection_size=m.embed_dim,
          hidden_act=act, layer_norm_eps=eps)}


interop.register(NAME)(sys.modules[__name__])
