"""Hugging Face `CLIPModel` safetensors <-> vlp_jax `two_tower` params.

The path is a model directory (model.safetensors, or pytorch_model.bin, and
config.json) or a weights file; a config.json beside it gives the head counts,
activation and LayerNorm eps (without one: heads = width // 64, QuickGELU, 1e-5, as
OpenAI's models). Text pooling: HF pools at the first end-of-text id (or the highest
id with the legacy eos_token_id=2), which equals vlp_jax's 'argmax' pool for CLIP's
tokenizer (its end-of-text token has the highest id).
"""
import json
import os
import sys

import ml_collections
import numpy as np

from vlp_jax import errors
from vlp_jax.interop import common, register

NAME = "hf_clip"
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_BLOCK_NAMES = dict(
    ln1_w="layer_norm1.weight", ln1_b="layer_norm1.bias", wq="self_attn.q_proj.weight",
    bq="self_attn.q_proj.bias", wk="self_attn.k_proj.weight", wv="self_attn.v_proj.weight",
    bv="self_attn.v_proj.bias", wo="self_attn.out_proj.weight",
    bo="self_attn.out_proj.bias", ln2_w="layer_norm2.weight", ln2_b="layer_norm2.bias",
    w1="mlp.fc1.weight", b1="mlp.fc1.bias", w2="mlp.fc2.weight", b2="mlp.fc2.bias")
# HF hidden_act <-> config.model.mlp_act.
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_NAMES = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
V, T = "vision_model.", "text_model."


def _weights_file(path):
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise errors.DataPathError(f"{path} has no model.safetensors or pytorch_model.bin.")
  return common.check_file(path, "HF CLIPModel weights")


def read(path: str) -> dict:
  """Flat arrays (`common.Arrays`; a `config.json` beside them is its `meta`)."""
  raw = common.Arrays(common.read_any(_weights_file(path)))
  cfg_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                          "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      raw.meta = json.load(f)
  return raw


def hf_config(raw: dict) -> dict:
  return getattr(raw, "meta", {}) or {}


def write(raw: dict, path: str, export_config: dict = None) -> None:
  """A directory (model.safetensors + config.json) or a .safetensors file (then
  config.json beside it only if the directory has none)."""
  if path.endswith(".safetensors"):
    directory, weights = os.path.dirname(os.path.abspath(path)), path
  else:
    directory, weights = path, os.path.join(path, "model.safetensors")
  common.write_safetensors(raw, weights, {"format": "pt"})
  cfg_path = os.path.join(directory, "config.json")
  if export_config is not None and (weights.endswith("model.safetensors")
                                    or not os.path.exists(cfg_path)):
    with open(cfg_path, "w") as f:
      json.dump(export_config, f, indent=2)


def native_image_size(raw: dict) -> int:
  patch = common.take(raw, V + "embeddings.patch_embedding.weight", NAME).shape[-1]
  n = raw[V + "embeddings.position_embedding.weight"].shape[0] - 1
  return int(round(n ** 0.5)) * patch


def model_config(raw: dict, base_model_cfg=None, head_dim: int = 64,
                 image_heads: int = 0, text_heads: int = 0):
  """`config.model` for these arrays (sizes from the arrays; heads, activation and
  eps from config.json when present)."""
  t = lambda n: common.take(raw, n, NAME)
  _check_supported(raw)
  hf = hf_config(raw)
  vc, tc = hf.get("vision_config", {}), hf.get("text_config", {})
  m = ml_collections.ConfigDict(base_model_cfg.to_dict()) if base_model_cfg else \
      _default_model()
  conv = t(V + "embeddings.patch_embedding.weight")
  iw = int(conv.shape[0])
  tw = int(t(T + "embeddings.token_embedding.weight").shape[1])
  m.name = "two_tower"
  m.embed_dim = int(t("text_projection.weight").shape[0])
  m.image.update(variant="", width=iw, patch_size=int(conv.shape[-1]),
                 depth=common.count_blocks(raw, V + "encoder.layers."),
                 mlp_dim=int(t(V + "encoder.layers.0.mlp.fc1.weight").shape[0]),
                 num_heads=int(image_heads or vc.get("num_attention_heads")
                               or iw // head_dim), pool="cls", ln_pre=True)
  m.text.update(vocab_size=int(t(T + "embeddings.token_embedding.weight").shape[0]),
                width=tw,
                context_length=int(t(T + "embeddings.position_embedding.weight").shape[0]),
                depth=common.count_blocks(raw, T + "encoder.layers."),
                mlp_dim=int(t(T + "encoder.layers.0.mlp.fc1.weight").shape[0]),
                num_heads=int(text_heads or tc.get("num_attention_heads") or tw // head_dim),
                causal=True, pool="argmax", padding_mask=False)
  acts = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
  eps = {vc.get("layer_norm_eps", 1e-5), tc.get("layer_norm_eps", 1e-5)}
  if len(acts) > 1 or len(eps) > 1 or not acts <= set(_ACTS):
    raise errors.CheckpointError(
        f"{NAME}: the towers' hidden_act {sorted(acts)} / layer_norm_eps {sorted(eps)} "
        f"must agree and be one of {sorted(_ACTS)} (config.model.mlp_act and "
        "layer_norm_eps apply to both towers).")
  m.mlp_act = _ACTS[acts.pop()]
  m.layer_norm_eps = float(eps.pop())
  m.use_logit_bias = False
  common.clip_heads(m)
  return m


def to_params(raw: dict, model_cfg, image_size: int) -> dict:
  """The two_tower param tree for `model_cfg` (positions resized to `image_size`)."""
  t = lambda n: common.take(raw, n, NAME)
  _check_supported(raw)
  if not model_cfg.image.get("ln_pre", False):
    raise errors.ConfigError("HF CLIP has a pre-LayerNorm: set "
                             "config.model.image.ln_pre=True.")
  conv = t(V + "embeddings.patch_embedding.weight")
  img = common.patch_embed_to_params(
      conv, t(V + "embeddings.class_embedding"),
      t(V + "embeddings.position_embedding.weight"),
      common.grid_of(image_size, conv.shape[-1]))
  img["ln_pre"] = _ln(raw, V + "pre_layrnorm")
  img["encoder"] = _encoder(raw, V + "encoder.layers.", V + "post_layernorm")
  ctx = model_cfg.text.context_length
  pos = t(T + "embeddings.position_embedding.weight")
  if ctx > pos.shape[0]:
    raise errors.ConfigError(f"config.model.text.context_length={ctx} exceeds the "
                             f"checkpoint's {pos.shape[0]} positions.")
  txt = {"token_embedding": {"embedding": common.f32(
      t(T + "embeddings.token_embedding.weight"))},
         "pos_embedding": common.f32(pos[:ctx])[None],
         "encoder": _encoder(raw, T + "encoder.layers.", T + "final_layer_norm")}
  params = {"img": img, "txt": txt,
            "scale": {"logit_scale": common.f32(t("logit_scale")).reshape(())},
            "img_proj": {"proj": {"kernel": common.f32(t("visual_projection.weight")).T}},
            "txt_proj": {"proj": {"kernel": common.f32(t("text_projection.weight")).T}}}
  return common.to_layout(params, model_cfg)


def from_params(params: dict, model_cfg) -> dict:
  """HF CLIPModel arrays of a two_tower model (any param layout)."""
  from vlp_jax.interop import open_clip  # pylint: disable=import-outside-toplevel
  open_clip._check_exportable(model_cfg, NAME)  # pylint: disable=protected-access
  p = common.from_layout(params)
  img, txt = p["img"], p["txt"]
  if "ln_pre" not in img:
    raise errors.ConfigError("cannot export to hf_clip: HF CLIP always has a "
                             "pre-LayerNorm and this model has none "
                             "(config.model.image.ln_pre=False); export to open_clip.")
  patch = int(round((img["embedding"]["kernel"].shape[0] / 3) ** 0.5))
  conv, cls, pos = common.patch_embed_from_params(img, patch)
  raw = {V + "embeddings.patch_embedding.weight": conv,
         V + "embeddings.class_embedding": cls,
         V + "embeddings.position_embedding.weight": pos,
         V + "pre_layrnorm.weight": common.f32(img["ln_pre"]["scale"]),
         V + "pre_layrnorm.bias": common.f32(img["ln_pre"]["bias"]),
         T + "embeddings.token_embedding.weight": common.f32(
             txt["token_embedding"]["embedding"]),
         T + "embeddings.position_embedding.weight": common.f32(txt["pos_embedding"])[0],
         "visual_projection.weight": np.ascontiguousarray(
             common.f32(p["img_proj"]["proj"]["kernel"]).T),
         "text_projection.weight": np.ascontiguousarray(
             common.f32(p["txt_proj"]["proj"]["kernel"]).T),
         "logit_scale": common.f32(p["scale"]["logit_scale"])}
  raw.update(_encoder_arrays(img["encoder"], V + "encoder.layers.", V + "post_layernorm"))
  raw.update(_encoder_arrays(txt["encoder"], T + "encoder.layers.", T + "final_layer_norm"))
  return raw


def export_config(model_cfg, image_size: int) -> dict:
  """The CLIPConfig (config.json) of the exported arrays."""
  from vlp_jax.models import builders  # pylint: disable=import-outside-toplevel
  kw = builders.tower_kwargs(model_cfg.image, None)
  tx = model_cfg.text
  act, eps = _ACT_NAMES[model_cfg.mlp_act], model_cfg.layer_norm_eps
  return {
      "architectures": ["CLIPModel"], "model_type": "clip",
      "projection_dim": model_cfg.embed_dim,
      "text_config": dict(model_type="clip_text_model", vocab_size=tx.vocab_size,
                          hidden_size=tx.width, intermediate_size=tx.mlp_dim,
                          num_hidden_layers=tx.depth, num_attention_heads=tx.num_heads,
                          max_position_embeddings=tx.context_length, hidden_act=act,
                          layer_norm_eps=eps, projection_dim=model_cfg.embed_dim,
                          bos_token_id=tx.vocab_size - 2, eos_token_id=tx.vocab_size - 1,
                          pad_token_id=0),
      "vision_config": dict(model_type="clip_vision_model", hidden_size=kw["width"],
                            intermediate_size=kw["mlp_dim"],
                            num_hidden_layers=kw["depth"],
                            num_attention_heads=kw["num_heads"], image_size=image_size,
                            patch_size=kw["patch_size"], hidden_act=act,
                            layer_norm_eps=eps, projection_dim=model_cfg.embed_dim),
  }


def _default_model():
  from vlp_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.default_config().model


def _ln(raw, prefix):
  return {"scale": common.f32(common.take(raw, prefix + ".weight", NAME)),
          "bias": common.f32(common.take(raw, prefix + ".bias", NAME))}


def _encoder(raw, prefix, final_ln):
  enc = {}
  for i in range(common.count_blocks(raw, prefix)):
    a = {k: common.take(raw, f"{prefix}{i}.{v}", NAME) for k, v in _BLOCK_NAMES.items()}
    enc[f"block_{i}"] = common.block_to_params(a)  # k_proj.bias dropped (exact).
  enc["ln_final"] = _ln(raw, final_ln)
  return enc


def _encoder_arrays(enc, prefix, final_ln):
  raw = {}
  for i in range(sum(1 for k in enc if k.startswith("block_"))):
    a = common.block_from_params(enc[f"block_{i}"])
    raw.update({f"{prefix}{i}.{v}": a[k] for k, v in _BLOCK_NAMES.items()})
    raw[f"{prefix}{i}.self_attn.k_proj.bias"] = a["bk"]
  raw[final_ln + ".weight"] = common.f32(enc["ln_final"]["scale"])
  raw[final_ln + ".bias"] = common.f32(enc["ln_final"]["bias"])
  return raw


def _check_supported(raw):
  known = (V + "embeddings.", T + "embeddings.", V + "pre_layrnorm.",
           V + "post_layernorm.", T + "final_layer_norm.", "visual_projection.weight",
           "text_projection.weight", "logit_scale")
  other = [k for k in raw if not k.startswith(known) and not (
      k.startswith((V + "encoder.layers.", T + "encoder.layers."))
      and any(f".{v}" in k for v in list(_BLOCK_NAMES.values()) + ["self_attn.k_proj.bias"]))
           and k not in _IGNORED]
  if other:
    raise errors.CheckpointError(
        f"{NAME} weights have arrays this converter does not support ({len(other)}: "
        f"{sorted(other)[:6]}); is this a CLIPModel checkpoint (SigLIP: 'hf_siglip')?")


register(NAME)(sys.modules[__name__])
