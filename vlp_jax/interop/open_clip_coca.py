"""open_clip CoCa checkpoints (`coca_ViT-B-32`, `coca_ViT-L-14`, ...) <-> vlp_jax
`coca` params in the 'open_clip' layout (`config.model.coca_layout`, see
vlp_jax/models/coca.py for what it computes).

Arrays (open_clip's names) -> vlp_jax params:
  visual.conv1 / class_embedding / positional_embedding / ln_pre / transformer
      -> img/ (as the CLIP formats; no final LayerNorm in the ViT)
  visual.attn_pool.{query, ln_q, ln_k, attn}  -> attn_pool/{query, ln_q, ln_k, attn}
      (torch MultiheadAttention with kdim != embed_dim: q/k/v_proj_weight; or one
      in_proj_weight when the widths agree)
  visual.ln_post, visual.proj                  -> ln_post, img_proj/proj
  text.token_embedding / cls_emb / positional_embedding (L + 1 rows) / transformer
      / ln_final / text_projection             -> txt/..., txt/ln_final, txt_proj/proj
  text_decoder.resblocks.{i} (self-attention) and .cross_attn.{i} (with ln_1_kv)
      -> decoder/block_{i}/{ln_attn, attn, ln_mlp, mlp} and {ln_cross, ln_cross_kv,
         cross_attn, ln_cross_mlp, cross_mlp}
  text_decoder.ln_final / text_projection      -> decoder/ln_final, vocab_proj/kernel
  logit_scale (logit_bias)                     -> scale/...
Attention key biases are dropped (exact; common.py) and exported as zeros. What the
arrays cannot tell: heads (width // head_dim, open_clip's 64-wide heads; or
image_heads / text_heads) and the pooler's heads (`pool_heads`, open_clip's default
8). open_clip's CoCa uses LayerNorm eps 1e-5 and exact GELU (QuickGELU for its
'-quickgelu' variants: `quick_gelu=True`).
"""
import numpy as np

from vlp_jax import errors
from vlp_jax.interop import common, open_clip, register

_V, _T, _D = "visual.", "text.", "text_decoder."
_CROSS = {"ln_attn": "ln_cross", "attn": "cross_attn", "ln_mlp": "ln_cross_mlp",
          "mlp": "cross_mlp"}  # A cross-attention block's parts -> decoder names.
_POOL_HEADS = 8  # open_clip's attn_pooler_heads default (coca_ViT-B-32 and L-14).
# The CLIP format's mappings of LayerNorms and transformer blocks, shared.
_LN, _ENCODER, _ENCODER_ARRAYS = (common.ln_params, open_clip.encoder_to_params,
                                  open_clip.encoder_arrays)


class CocaFormat(open_clip.Format):
  """open_clip's CoCa: the open_clip file types and conventions, CoCa's arrays."""

  def native_image_size(self, raw: dict) -> int:
    patch = common.take(raw, _V + "conv1.weight", self.name).shape[-1]
    n = common.take(raw, _V + "positional_embedding", self.name).shape[0] - 1
    return int(round(n ** 0.5)) * patch

  def model_config(self, raw: dict, base_model_cfg=None, quick_gelu=None,
                   head_dim: int = 64, image_heads: int = 0, text_heads: int = 0,
                   pool_heads: int = 0, mlp_act: str = None):
    """`config.model` (name 'coca', coca_layout 'open_clip') for these arrays on top
    of `base_model_cfg`: sizes from the arrays, heads = width // head_dim (or the
    given counts), the pooler's heads `pool_heads` (else the base's
    `decoder.pool_heads`, else open_clip's default 8)."""
    t = lambda n: common.take(raw, n, self.name)
    _check_supported(raw, self.name)
    m = open_clip.Format.model_config(self, _as_clip(raw), base_model_cfg, quick_gelu,
                                      head_dim, image_heads, text_heads, mlp_act)
    m.name = "coca"
    m.coca_layout = "open_clip"
    m.text.context_length = int(t(_T + "positional_embedding").shape[0]) - 1
    m.text.padding_mask = True  # open_clip's class-token key mask.
    # The layout pools the class token and ignores text.pool: the recipe's is kept.
    m.text.pool = base_model_cfg.text.pool if base_model_cfg is not None else "last"
    query = t(_V + "attn_pool.query")
    m.decoder.update(depth=common.count_blocks(raw, _D + "resblocks."),
                     num_queries=int(query.shape[0]))
    width = int(query.shape[1])
    heads = pool_heads or m.decoder.get("pool_heads", 0) or _POOL_HEADS
    if width % heads:
      raise errors.ConfigError(f"the CoCa pooler's width {width} is not divisible by "
                               f"{heads} heads: give pool_heads (or set "
                               "config.model.decoder.pool_heads).")
    m.decoder.pool_heads = int(heads)
    dec_mlp = int(t(_D + "resblocks.0.mlp.c_fc.weight").shape[0])
    if dec_mlp != m.text.mlp_dim or width != m.text.width:
      raise errors.CheckpointError(
          f"{self.name}: the decoder's MLP width {dec_mlp} / the pooler width {width} "
          f"differ from the text tower's {m.text.mlp_dim} / {m.text.width}; vlp_jax's "
          "CoCa shares them (text.mlp_dim, text.width = embed_dim).")
    return m

  def to_params(self, raw: dict, model_cfg, image_size: int) -> dict:
    """The coca ('open_clip' layout) param tree for `model_cfg`."""
    t = lambda n: common.take(raw, n, self.name)
    _check_supported(raw, self.name)
    ln = lambda prefix: _LN(raw, prefix, self.name)
    encoder = lambda prefix, final: _ENCODER(raw, prefix, final, self.name)
    conv = t(_V + "conv1.weight")
    img = common.patch_embed_to_params(conv, t(_V + "class_embedding"),
                                       t(_V + "positional_embedding"),
                                       common.grid_of(image_size, conv.shape[-1]))
    if model_cfg.image.get("ln_pre", False):
      img["ln_pre"] = ln(_V + "ln_pre")
    elif _V + "ln_pre.weight" in raw:
      raise errors.ConfigError("the checkpoint has visual.ln_pre: set "
                               "config.model.image.ln_pre=True.")
    img["encoder"] = encoder(_V + "transformer.resblocks.", _V + "ln_post")
    ln_post = img["encoder"].pop("ln_final")
    ctx = model_cfg.text.context_length
    pos = t(_T + "positional_embedding")
    if ctx + 1 > pos.shape[0]:
      raise errors.ConfigError(f"config.model.text.context_length={ctx} exceeds the "
                               f"checkpoint's {pos.shape[0] - 1} text positions.")
    txt = {"token_embedding": {"embedding": common.f32(t(_T + "token_embedding.weight"))},
           "cls": common.f32(t(_T + "cls_emb")).reshape(1, 1, -1),
           "pos_embedding": common.f32(pos[:ctx + 1])[None],
           "encoder": encoder(_T + "transformer.resblocks.", _T + "ln_final")}
    txt["ln_final"] = txt["encoder"].pop("ln_final")
    selfs = encoder(_D + "resblocks.", _D + "ln_final")
    cross = encoder(_D + "cross_attn.", _D + "ln_final")
    decoder = {"ln_final": selfs.pop("ln_final")}
    for i in range(model_cfg.decoder.depth):
      b = dict(selfs[f"block_{i}"])
      b.update({_CROSS[k]: v for k, v in cross[f"block_{i}"].items()})
      b["ln_cross_kv"] = ln(f"{_D}cross_attn.{i}.ln_1_kv")
      decoder[f"block_{i}"] = b
    scale = {"logit_scale": common.f32(t("logit_scale")).reshape(())}
    if model_cfg.get("use_logit_bias", False):
      scale["logit_bias"] = common.f32(t("logit_bias")).reshape(())
    params = {
        "img": img, "txt": txt, "scale": scale, "ln_post": ln_post,
        "attn_pool": _pool_to_params(raw, self.name),
        "img_proj": {"proj": {"kernel": common.f32(t(_V + "proj"))}},
        "txt_proj": {"proj": {"kernel": common.f32(t(_T + "text_projection"))}},
        "vocab_proj": {"kernel": common.f32(t(_D + "text_projection"))},
        "decoder": {"encoder": decoder}}
    params = common.to_layout(params, model_cfg)
    params["decoder"] = params["decoder"]["encoder"]
    return params

  def from_params(self, params: dict, model_cfg) -> dict:
    """open_clip CoCa arrays of a coca model in the 'open_clip' layout (any param
    layout)."""
    _check_exportable(model_cfg, self.name)
    p = dict(params)
    p["decoder"] = {"encoder": p["decoder"]}
    p = common.from_layout(p)
    img, txt, dec = p["img"], p["txt"], p["decoder"]["encoder"]
    patch = int(round((img["embedding"]["kernel"].shape[0] / 3) ** 0.5))
    conv, cls, pos = common.patch_embed_from_params(img, patch)
    arrays = _ENCODER_ARRAYS
    raw = {_V + "conv1.weight": conv, _V + "class_embedding": cls,
           _V + "positional_embedding": pos,
           _V + "proj": common.f32(p["img_proj"]["proj"]["kernel"]),
           _T + "token_embedding.weight": common.f32(txt["token_embedding"]["embedding"]),
           _T + "cls_emb": common.f32(txt["cls"]).reshape(-1),
           _T + "positional_embedding": common.f32(txt["pos_embedding"])[0],
           _T + "text_projection": common.f32(p["txt_proj"]["proj"]["kernel"]),
           _D + "text_projection": common.f32(p["vocab_proj"]["kernel"]),
           "logit_scale": common.f32(p["scale"]["logit_scale"])}
    if "logit_bias" in p["scale"]:
      raw["logit_bias"] = common.f32(p["scale"]["logit_bias"])
    if "ln_pre" in img:
      raw.update(_ln_arrays(img["ln_pre"], _V + "ln_pre"))
    raw.update(arrays(dict(img["encoder"], ln_final=p["ln_post"]),
                      _V + "transformer.resblocks.", _V + "ln_post"))
    raw.update(arrays(dict(txt["encoder"], ln_final=txt["ln_final"]),
                      _T + "transformer.resblocks.", _T + "ln_final"))
    blocks = [dec[f"block_{i}"] for i in range(model_cfg.decoder.depth)]
    inverse = {v: k for k, v in _CROSS.items()}
    selfs = {f"block_{i}": {k: b[k] for k in _CROSS} for i, b in enumerate(blocks)}
    cross = {f"block_{i}": {inverse[k]: b[k] for k in inverse}
             for i, b in enumerate(blocks)}
    raw.update(arrays(dict(selfs, ln_final=dec["ln_final"]), _D + "resblocks.",
                      _D + "ln_final"))
    raw.update(arrays(dict(cross, ln_final=dec["ln_final"]), _D + "cross_attn.",
                      _D + "ln_final"))
    for i, b in enumerate(blocks):
      raw.update(_ln_arrays(b["ln_cross_kv"], f"{_D}cross_attn.{i}.ln_1_kv"))
    raw.update(_pool_arrays(p["attn_pool"]))
    raw.update(_ln_arrays(p["ln_post"], _V + "ln_post"))
    return raw

  def export_config(self, model_cfg, image_size: int) -> dict:
    """open_clip's CoCa model config (a model json, as `coca_ViT-B-32.json`) of the
    exported arrays."""
    base = open_clip.Format.export_config(self, model_cfg, image_size)
    vision, text = base["vision_cfg"], base["text_cfg"]
    t, d = model_cfg.text, model_cfg.decoder
    vision.update(attentional_pool=True, attn_pooler_heads=int(d.pool_heads or
                                                               vision["width"] //
                                                               vision["head_width"]),
                  attn_pooler_queries=int(d.num_queries), output_tokens=True)
    text.update(embed_cls=True, output_tokens=True)
    multimodal = dict(context_length=t.context_length, vocab_size=t.vocab_size,
                      width=t.width, heads=t.num_heads, layers=d.depth,
                      attn_pooler_heads=vision["attn_pooler_heads"])
    return dict(base, multimodal_cfg=multimodal, custom_text=True)


def _as_clip(raw):
  """The CLIP-named view of CoCa's arrays the CLIP `model_config` reads (sizes)."""
  t = lambda n: common.take(raw, n, "open_clip_coca")
  out = {k: raw[k] for k in raw if k.startswith(_V) or k == "logit_scale"
         or k == "logit_bias"}
  out.update({k[len(_T):]: raw[k] for k in raw if k.startswith(_T)})
  out["text_projection"] = t(_T + "text_projection")
  return {k: v for k, v in out.items()
          if not k.startswith(_V + "attn_pool.") and k != "cls_emb"}


_ln_arrays = common.ln_arrays


def _pool_to_params(raw, fmt):
  """visual.attn_pool.* -> {query, ln_q, ln_k, attn/{query, key, value, out}}."""
  t = lambda n: common.take(raw, _V + "attn_pool." + n, fmt)
  at = "attn."
  if _V + "attn_pool.attn.in_proj_weight" in raw:  # kdim == embed_dim
    wq, wk, wv = np.split(np.asarray(t(at + "in_proj_weight")), 3)
  else:
    wq, wk, wv = (t(at + f"{n}_proj_weight") for n in "qkv")
  bq, _, bv = np.split(np.asarray(t(at + "in_proj_bias")), 3)  # Key bias dropped (exact).
  k = lambda w: common.f32(w).T
  ln = lambda n: _LN(raw, _V + "attn_pool." + n, fmt)
  return {"query": common.f32(t("query")), "ln_q": ln("ln_q"), "ln_k": ln("ln_k"),
          "attn": {"query": {"kernel": k(wq), "bias": common.f32(bq)},
                   "key": {"kernel": k(wk)},
                   "value": {"kernel": k(wv), "bias": common.f32(bv)},
                   "out": {"kernel": k(t(at + "out_proj.weight")),
                           "bias": common.f32(t(at + "out_proj.bias"))}}}


def _pool_arrays(pool):
  """The inverse of `_pool_to_params` (separate q/k/v weights unless the key width
  equals the query width, as torch's MultiheadAttention stores them)."""
  a, pre = pool["attn"], _V + "attn_pool."
  wq, wk, wv = (common.f32(a[n]["kernel"]).T for n in ("query", "key", "value"))
  bq = common.f32(a["query"]["bias"])
  raw = {pre + "query": common.f32(pool["query"]),
         pre + "attn.in_proj_bias": np.concatenate([bq, np.zeros_like(bq),
                                                    common.f32(a["value"]["bias"])]),
         pre + "attn.out_proj.weight": common.f32(a["out"]["kernel"]).T,
         pre + "attn.out_proj.bias": common.f32(a["out"]["bias"])}
  if wk.shape == wq.shape:
    raw[pre + "attn.in_proj_weight"] = np.concatenate([wq, wk, wv])
  else:
    raw.update({pre + "attn.q_proj_weight": wq, pre + "attn.k_proj_weight": wk,
                pre + "attn.v_proj_weight": wv})
  raw.update(_ln_arrays(pool["ln_q"], pre + "ln_q"))
  raw.update(_ln_arrays(pool["ln_k"], pre + "ln_k"))
  return {k: np.ascontiguousarray(v) for k, v in raw.items()}


def _check_supported(raw, fmt):
  if "text_decoder.ln_final.weight" not in raw or _V + "attn_pool.query" not in raw:
    raise errors.CheckpointError(
        f"{fmt} weights: no open_clip CoCa arrays (text_decoder.*, "
        "visual.attn_pool.*); for an open_clip CLIP use format 'open_clip'.")
  extra = [k for k in raw if not _known(k)]
  if extra:
    raise errors.CheckpointError(
        f"{fmt} weights have arrays this converter does not support ({len(extra)}: "
        f"{sorted(extra)[:4]}): only the original open_clip CoCa layout is (ViT towers, "
        "one attentional pooler, no layer scale, bias-free projections).")


_BLOCKS = (_V + "transformer.resblocks.", _T + "transformer.resblocks.",
           _D + "resblocks.", _D + "cross_attn.")
_BLOCK_PARTS = (".ln_1.", ".ln_2.", ".attn.in_proj_", ".attn.out_proj.", ".mlp.c_fc.",
                ".mlp.c_proj.", ".ln_1_kv.")
_NAMES = (_V + "conv1.weight", _V + "class_embedding", _V + "positional_embedding",
          _V + "ln_pre.", _V + "ln_post.", _V + "proj", _V + "attn_pool.query",
          _V + "attn_pool.ln_q.", _V + "attn_pool.ln_k.", _V + "attn_pool.attn.",
          _T + "token_embedding.weight", _T + "cls_emb", _T + "positional_embedding",
          _T + "ln_final.", _D + "ln_final.", "logit_scale", "logit_bias")
_EXACT = (_T + "text_projection", _D + "text_projection")


def _known(name):
  """Whether array `name` is one this converter maps (or a buffer it may ignore)."""
  if name.endswith(("attn_mask", "position_ids")) or name in _EXACT:
    return True
  if name.startswith(_BLOCKS):
    return any(p in name for p in _BLOCK_PARTS)
  return name.startswith(_NAMES)


def _check_exportable(m, fmt):
  problems = []
  if m.name != "coca" or m.get("coca_layout", "vlp_jax") != "open_clip":
    problems.append("model.name='coca' with model.coca_layout='open_clip'")
  if not m.text.get("padding_mask", True):
    problems.append("model.text.padding_mask=True (open_clip's class-token mask)")
  if abs(m.layer_norm_eps - 1e-5) > 1e-12:
    problems.append("model.layer_norm_eps=1e-5 (open_clip's pooler and decoder "
                    "LayerNorms always use it)")
  if m.mlp_act not in ("gelu", "quick_gelu"):
    problems.append("model.mlp_act 'gelu' or 'quick_gelu' (open_clip's decoder "
                    "takes no other)")
  if problems:
    raise errors.ConfigError(f"cannot export to {fmt}: needs " + "; ".join(problems)
                             + ".")


OPEN_CLIP_COCA = register("open_clip_coca")(
    CocaFormat("open_clip_coca", quick_gelu=False))
