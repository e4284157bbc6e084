"""open_clip and OpenAI CLIP checkpoints (ViT image tower, causal text tower) <->
vlp_jax `two_tower` params.

Both libraries name the arrays alike (`visual.conv1.weight`, `visual.class_embedding`,
`visual.transformer.resblocks.{i}.attn.in_proj_weight`, `token_embedding.weight`,
`text_projection`, `logit_scale`, ...). The formats differ only in their defaults:
'openai' uses QuickGELU (every OpenAI model), 'open_clip' the exact GELU (open_clip's
default; its '-quickgelu' models need `quick_gelu=True`). Files: .safetensors, or
torch .bin/.pt (a plain state dict is read without torch; OpenAI's TorchScript .pt
needs the `vlp_jax[torch]` extra).

CoCa: format 'open_clip_coca' (open_clip_coca.py). Not covered: ResNet ("RN50") image
towers, timm / HF-hub text towers, layer scale (`ls_1`), attentional poolers; their
arrays are reported as unsupported.
"""
import ml_collections
import numpy as np

from vlp_jax import errors
from vlp_jax.interop import common, register

# Buffers some checkpoints carry that are not parameters.
_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")
_BLOCK_NAMES = dict(ln1_w="ln_1.weight", ln1_b="ln_1.bias", wo="attn.out_proj.weight",
                    bo="attn.out_proj.bias", ln2_w="ln_2.weight", ln2_b="ln_2.bias",
                    w1="mlp.c_fc.weight", b1="mlp.c_fc.bias", w2="mlp.c_proj.weight",
                    b2="mlp.c_proj.bias")


class Format:
  """One of the two formats ('open_clip' or 'openai'): the same arrays, other defaults."""

  def __init__(self, name: str, quick_gelu: bool, act_known: bool = False):
    # act_known: every checkpoint of the format has its default activation (OpenAI:
    # QuickGELU), so config.init_from checks the run's against it.
    self.name, self.quick_gelu, self.act_known = name, quick_gelu, act_known

  def read(self, path: str) -> dict:
    """Flat arrays of a .safetensors / .bin / .pt checkpoint."""
    return common.read_any(path)

  def write(self, raw: dict, path: str, export_config: dict = None) -> None:
    """Writes `raw` as .safetensors (and the open_clip model config as PATH.json)."""
    if not path.endswith(".safetensors"):
      raise errors.ConfigError(f"{self.name} export writes .safetensors; got {path!r}.")
    common.write_safetensors(raw, path, {"format": "pt"})
    if export_config is not None:
      import json  # pylint: disable=import-outside-toplevel
      with open(path[:-len(".safetensors")] + ".json", "w") as f:
        json.dump(export_config, f, indent=2)

  def native_image_size(self, raw: dict) -> int:
    """The image side the checkpoint was trained at (from its position grid)."""
    patch = common.take(raw, "visual.conv1.weight", self.name).shape[-1]
    n = raw["visual.positional_embedding"].shape[0] - 1
    return int(round(n ** 0.5)) * patch

  def model_config(self, raw: dict, base_model_cfg=None, quick_gelu=None,
                   head_dim: int = 64, image_heads: int = 0, text_heads: int = 0,
                   mlp_act: str = None):
    """`config.model` for these arrays on top of `base_model_cfg`: sizes from the
    arrays; heads = width // head_dim (open_clip's and OpenAI's rule; or give
    image_heads / text_heads); QuickGELU per the format (or `quick_gelu`; or any
    `mlp_act`: the activation is not in the weights)."""
    t = lambda n: common.take(raw, n, self.name)
    _check_supported(raw, self.name)
    m = ml_collections.ConfigDict(base_model_cfg.to_dict()) if base_model_cfg else \
        common.default_model()
    conv = t("visual.conv1.weight")
    iw, tw = conv.shape[0], t("token_embedding.weight").shape[1]
    vis = "visual.transformer.resblocks."
    m.name = "two_tower"
    m.embed_dim = int(t("text_projection").shape[1])
    m.image.update(variant="", width=int(iw), patch_size=int(conv.shape[-1]),
                   depth=common.count_blocks(raw, vis),
                   mlp_dim=int(t(vis + "0.mlp.c_fc.weight").shape[0]),
                   num_heads=int(image_heads or _heads(
                       iw, head_dim, "image", _explicit_heads(m.image))),
                   pool="cls", ln_pre="visual.ln_pre.weight" in raw)
    m.text.update(vocab_size=int(t("token_embedding.weight").shape[0]), width=int(tw),
                  context_length=int(t("positional_embedding").shape[0]),
                  depth=common.count_blocks(raw, "transformer.resblocks."),
                  mlp_dim=int(t("transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
                  num_heads=int(text_heads or _heads(tw, head_dim, "text",
                                                     m.text.get("num_heads", 0))),
                  causal=True, pool="argmax", padding_mask=False)
    quick = self.quick_gelu if quick_gelu is None else quick_gelu
    m.mlp_act = mlp_act or ("quick_gelu" if quick else "gelu")
    m.layer_norm_eps = 1e-5
    m.use_logit_bias = "logit_bias" in raw
    common.clip_heads(m)
    return m

  def options_from_model(self, model_cfg) -> dict:
    """`model_config` options that take from a run's `config.model` what the
    arrays cannot tell, for config.init_from: the head counts and (open_clip, whose
    files do not say GELU or QuickGELU; not 'openai', always QuickGELU) `mlp_act`."""
    from vlp_jax.models import builders  # pylint: disable=import-outside-toplevel
    try:
      image_heads = builders.tower_kwargs(model_cfg.image, None)["num_heads"]
    except (ValueError, KeyError):
      image_heads = 0
    opts = dict(image_heads=int(image_heads),
                text_heads=int(model_cfg.text.get("num_heads", 0)))
    if not self.act_known:
      opts["mlp_act"] = model_cfg.mlp_act
    return opts

  def to_params(self, raw: dict, model_cfg, image_size: int) -> dict:
    """The two_tower param tree for `model_cfg` (positions resized to `image_size`)."""
    t = lambda n: common.take(raw, n, self.name)
    _check_supported(raw, self.name)
    conv = t("visual.conv1.weight")
    grid = common.grid_of(image_size, conv.shape[-1])
    img = common.patch_embed_to_params(conv, t("visual.class_embedding"),
                                       t("visual.positional_embedding"), grid)
    if model_cfg.image.get("ln_pre", False):
      img["ln_pre"] = common.ln_params(raw, "visual.ln_pre", self.name)
    elif "visual.ln_pre.weight" in raw:
      raise errors.ConfigError("the checkpoint has visual.ln_pre: set "
                               "config.model.image.ln_pre=True.")
    img["encoder"] = encoder_to_params(raw, "visual.transformer.resblocks.",
                                      "visual.ln_post", self.name)
    ctx = model_cfg.text.context_length
    pos = t("positional_embedding")
    if ctx > pos.shape[0]:
      raise errors.ConfigError(f"config.model.text.context_length={ctx} exceeds the "
                               f"checkpoint's {pos.shape[0]} positions.")
    txt = {"token_embedding": {"embedding": common.f32(t("token_embedding.weight"))},
           "pos_embedding": common.f32(pos[:ctx])[None],
           "encoder": encoder_to_params(raw, "transformer.resblocks.", "ln_final",
                                      self.name)}
    scale = {"logit_scale": common.f32(t("logit_scale")).reshape(())}
    if model_cfg.get("use_logit_bias", False):
      scale["logit_bias"] = common.f32(t("logit_bias")).reshape(())
    params = {"img": img, "txt": txt, "scale": scale,
              "img_proj": {"proj": {"kernel": common.f32(t("visual.proj"))}},
              "txt_proj": {"proj": {"kernel": common.f32(t("text_projection"))}}}
    return common.to_layout(params, model_cfg)

  def from_params(self, params: dict, model_cfg) -> dict:
    """open_clip / OpenAI arrays of a two_tower model (any param layout)."""
    common.check_clip_exportable(model_cfg, self.name)
    p = common.from_layout(params)
    img, txt = p["img"], p["txt"]
    patch = int(round((img["embedding"]["kernel"].shape[0] / 3) ** 0.5))
    conv, cls, pos = common.patch_embed_from_params(img, patch)
    raw = {"visual.conv1.weight": conv, "visual.class_embedding": cls,
           "visual.positional_embedding": pos,
           "visual.proj": common.f32(p["img_proj"]["proj"]["kernel"]),
           "token_embedding.weight": common.f32(txt["token_embedding"]["embedding"]),
           "positional_embedding": common.f32(txt["pos_embedding"])[0],
           "text_projection": common.f32(p["txt_proj"]["proj"]["kernel"]),
           "logit_scale": common.f32(p["scale"]["logit_scale"])}
    if "logit_bias" in p["scale"]:
      raw["logit_bias"] = common.f32(p["scale"]["logit_bias"])
    if "ln_pre" in img:
      raw["visual.ln_pre.weight"] = common.f32(img["ln_pre"]["scale"])
      raw["visual.ln_pre.bias"] = common.f32(img["ln_pre"]["bias"])
    raw.update(encoder_arrays(img["encoder"], "visual.transformer.resblocks.",
                              "visual.ln_post"))
    raw.update(encoder_arrays(txt["encoder"], "transformer.resblocks.", "ln_final"))
    return raw

  def export_config(self, model_cfg, image_size: int) -> dict:
    """open_clip's model config (`open_clip.create_model(..)` / a model json) of the
    exported arrays: sizes, activation, LayerNorm eps, no ln_pre if ours has none."""
    im, tx = model_cfg.image, model_cfg.text
    iw = _tower_width(im)
    act = {"gelu_tanh": {"approximate": "tanh"}}.get(model_cfg.mlp_act)
    vision = dict(layers=im.depth, width=iw, head_width=iw // im.num_heads,
                  mlp_ratio=im.mlp_dim / iw, patch_size=im.patch_size,
                  image_size=image_size, no_ln_pre=not im.get("ln_pre", False),
                  norm_kwargs={"eps": model_cfg.layer_norm_eps})
    text = dict(context_length=tx.context_length, vocab_size=tx.vocab_size,
                width=tx.width, heads=tx.num_heads, layers=tx.depth,
                mlp_ratio=tx.mlp_dim / tx.width,
                norm_kwargs={"eps": model_cfg.layer_norm_eps})
    if act:
      vision["act_kwargs"] = text["act_kwargs"] = act
    return dict(embed_dim=model_cfg.embed_dim, quick_gelu=model_cfg.mlp_act == "quick_gelu",
                vision_cfg=vision, text_cfg=text)


def _heads(width, head_dim, tower, fallback=0):
  """width // head_dim; else `fallback` (the base config's) if it divides width."""
  if width % head_dim == 0:
    return width // head_dim
  if fallback and width % fallback == 0:
    return fallback
  raise errors.ConfigError(f"the {tower} width {width} is not a multiple of head_dim "
                           f"{head_dim}: give the number of heads explicitly.")


def _explicit_heads(image_cfg):
  try:
    from vlp_jax.models import builders  # pylint: disable=import-outside-toplevel
    return builders.tower_kwargs(image_cfg, None)["num_heads"]
  except ValueError:
    return 0


def _tower_width(image_cfg):
  from vlp_jax.models import builders  # pylint: disable=import-outside-toplevel
  return builders.tower_kwargs(image_cfg, None)["width"]


def _read_block(raw, b, fmt):
  """One block's arrays for `common.block_to_params` (in_proj split into q, k, v)."""
  wq, wk, wv = np.split(np.asarray(common.take(raw, b + "attn.in_proj_weight", fmt)), 3)
  bq, _, bv = np.split(np.asarray(common.take(raw, b + "attn.in_proj_bias", fmt)), 3)
  a = {k: common.take(raw, b + v, fmt) for k, v in _BLOCK_NAMES.items()}
  return dict(a, wq=wq, wk=wk, wv=wv, bq=bq, bv=bv)  # The key bias is dropped (exact).


def _write_block(a, b):
  raw = {b + v: a[k] for k, v in _BLOCK_NAMES.items()}
  raw[b + "attn.in_proj_weight"] = np.concatenate([a["wq"], a["wk"], a["wv"]])
  raw[b + "attn.in_proj_bias"] = np.concatenate([a["bq"], a["bk"], a["bv"]])
  return raw


def encoder_to_params(raw, prefix, final_ln, fmt):
  """A canonical vlp_jax encoder from open_clip's `prefix{i}.` resblocks and the
  LayerNorm `final_ln`."""
  return common.encoder_to_params(raw, prefix, final_ln, fmt,
                                  lambda r, b: _read_block(r, b, fmt))


def encoder_arrays(enc, prefix, final_ln):
  """open_clip's arrays of a canonical vlp_jax encoder (inverse of
  `encoder_to_params`)."""
  return common.encoder_from_params(enc, prefix, final_ln, _write_block)


def _check_supported(raw, fmt):
  known = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
           "visual.ln_pre.", "visual.ln_post.", "visual.proj", "token_embedding.weight",
           "positional_embedding", "ln_final.", "text_projection", "logit_scale",
           "logit_bias")
  block = (".ln_1.", ".ln_2.", ".attn.in_proj_", ".attn.out_proj.", ".mlp.c_fc.",
           ".mlp.c_proj.")
  other = [k for k in raw if k not in _IGNORED and not k.startswith(known) and not (
      k.startswith(("transformer.resblocks.", "visual.transformer.resblocks."))
      and any(s in k for s in block))]
  if other:
    raise errors.CheckpointError(
        f"{fmt} weights have arrays this converter does not support ({len(other)}: "
        f"{sorted(other)[:6]}): only ViT image towers with class-token pooling and "
        "the causal text transformer are (no ResNet, timm/HF towers, layer scale; for "
        "an open_clip CoCa use format 'open_clip_coca').")


OPEN_CLIP = register("open_clip")(Format("open_clip", quick_gelu=False))
OPENAI = register("openai")(Format("openai", quick_gelu=True, act_known=True))
