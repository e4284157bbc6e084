"""Hugging Face `CLIPModel` safetensors <-> vlp_jax `two_tower` params.

The path is a model directory (model.safetensors, or pytorch_model.bin, and
config.json) or a weights file; a config.json beside it gives the head counts,
activation and LayerNorm eps (without one: heads = width // 64, QuickGELU, 1e-5, as
OpenAI's models). Text pooling: HF pools at the first end-of-text id (or the highest
id with the legacy eos_token_id=2), which equals vlp_jax's 'argmax' pool when the
tokenizer's end-of-text token has the highest id (CLIP's); export writes the run's
tokenizer ids (tools/convert_weights.py) and refuses other tokenizers
(`check_token_ids`).
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
  """The config.json that came with the arrays (`raw.meta`; {} without one)."""
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
  """The image side of the checkpoint's position grid."""
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
      common.default_model()
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
  img["ln_pre"] = common.ln_params(raw, V + "pre_layrnorm", NAME)
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
  common.check_clip_exportable(model_cfg, NAME)
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


def check_token_ids(model_cfg, token_ids: dict) -> None:
  """A ConfigError unless HF's CLIPTextTransformer pools where our text tower does
  with these ids ({bos, eos, pad, vocab_size} of the run's tokenizer).

  HF pools at the argmax token id when eos_token_id == 2 (legacy configs), else at
  the first eos_token_id. Ours: 'argmax' (highest id) or 'eos' (last non-pad token).
  Both agree when the tokenizer's EOS is its highest id (and, for 'eos', is not
  also its padding)."""
  eos, vocab = token_ids["eos"], token_ids["vocab_size"]
  if eos is not None and eos >= model_cfg.text.vocab_size:
    raise errors.ConfigError(
        f"cannot export to {NAME}: the tokenizer's end-of-text id {eos} is outside the "
        f"model's vocabulary ({model_cfg.text.vocab_size}); is config.data.tokenizer "
        "the one the model was trained with?")
  if eos is None or eos != vocab - 1:
    raise errors.ConfigError(
        f"cannot export to {NAME}: the tokenizer's end-of-text id {eos} is not its "
        f"highest id ({vocab - 1}); HF CLIP pools at the first eos_token_id (or the "
        "highest id when it is 2), which would not be where this model pools "
        f"(text.pool={model_cfg.text.pool!r})." + (
            " Export to open_clip instead (it pools at the highest id, as 'argmax')."
            if model_cfg.text.pool == "argmax" else ""))
  if model_cfg.text.pool == "eos" and token_ids.get("pad") == eos:
    raise errors.ConfigError(
        f"cannot export to {NAME}: the tokenizer pads with its end-of-text id {eos}, "
        "so text.pool='eos' (last non-pad token) is not HF's first end-of-text token.")


def export_config(model_cfg, image_size: int, token_ids: dict = None) -> dict:
  """The CLIPConfig (config.json) of the exported arrays. `token_ids`: {bos, eos,
  pad, vocab_size} of the run's tokenizer (`check_token_ids`); None = CLIP's
  convention (eos = vocab_size - 1, bos = vocab_size - 2, pad 0)."""
  from vlp_jax.models import builders  # pylint: disable=import-outside-toplevel
  kw = builders.tower_kwargs(model_cfg.image, None)
  tx = model_cfg.text
  if token_ids is None:
    token_ids = dict(bos=tx.vocab_size - 2, eos=tx.vocab_size - 1, pad=0,
                     vocab_size=tx.vocab_size)
  check_token_ids(model_cfg, token_ids)
  bos = token_ids["bos"] if token_ids.get("bos") is not None else token_ids["eos"]
  act, eps = _ACT_NAMES[model_cfg.mlp_act], model_cfg.layer_norm_eps
  return {
      "architectures": ["CLIPModel"], "model_type": "clip",
      "projection_dim": model_cfg.embed_dim,
      "text_config": dict(model_type="clip_text_model", vocab_size=tx.vocab_size,
                          hidden_size=tx.width, intermediate_size=tx.mlp_dim,
                          num_hidden_layers=tx.depth, num_attention_heads=tx.num_heads,
                          max_position_embeddings=tx.context_length, hidden_act=act,
                          layer_norm_eps=eps, projection_dim=model_cfg.embed_dim,
                          bos_token_id=int(bos), eos_token_id=int(token_ids["eos"]),
                          pad_token_id=int(token_ids.get("pad") or 0)),
      "vision_config": dict(model_type="clip_vision_model", hidden_size=kw["width"],
                            intermediate_size=kw["mlp_dim"],
                            num_hidden_layers=kw["depth"],
                            num_attention_heads=kw["num_heads"], image_size=image_size,
                            patch_size=kw["patch_size"], hidden_act=act,
                            layer_norm_eps=eps, projection_dim=model_cfg.embed_dim),
  }


def _read_block(raw, b):
  return {k: common.take(raw, b + v, NAME) for k, v in _BLOCK_NAMES.items()}


def _write_block(a, b):
  raw = {b + v: a[k] for k, v in _BLOCK_NAMES.items()}
  raw[b + "self_attn.k_proj.bias"] = a["bk"]
  return raw


def _encoder(raw, prefix, final_ln):
  # k_proj.bias is dropped (exact; common.py).
  return common.encoder_to_params(raw, prefix, final_ln, NAME, _read_block)


def _encoder_arrays(enc, prefix, final_ln):
  return common.encoder_from_params(enc, prefix, final_ln, _write_block)


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
