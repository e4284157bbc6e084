"""big_vision SigLIP two-tower `.npz` checkpoints <-> vlp_jax.

Names are big_vision's '/'-joined flax paths (models/proj/image_text/two_towers.py:
`img` = models/vit.py, `txt` = models/proj/image_text/text_transformer.py, `t`, `b`),
e.g. `img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`
(W, heads, head_dim). Read accepts a leading `params/` or `opt/target/`, blocks
scanned under `encoderblock/` with a leading layer axis (big_vision `scan=True`),
and bfloat16 arrays; export writes unrolled float32 blocks without prefix, as the
published SigLIP files. An image `head` (ViT `num_classes`) or a text `head` is a
projection with bias (`proj_bias`); without one that tower has no projection.
Only MAP-pooled image towers (SigLIP's) are handled. Checked against big_vision's
source, not against a published checkpoint file.
"""
import os
import re
import sys

import numpy as np

from vlp_jax import errors, interop
from vlp_jax.interop import common, siglip_tree
from vlp_jax.interop.siglip_tree import Entry, same
from vlp_jax.models import builders

NAME = "big_vision"
PREFIXES = ("params/", "opt/target/")
_SCANNED = re.compile(r"^(.*)/encoderblock/(.*)$")
ATTN = "MultiHeadDotProductAttention_0"


def read(path):
  """The npz's arrays by name (bfloat16 stored as 2-byte voids becomes bfloat16)."""
  common.check_file(path, f"{NAME} .npz weights")
  with np.load(path, allow_pickle=False) as npz:
    return {k: _recover_dtype(npz[k]) for k in npz.files}


def _recover_dtype(v):
  """npz stores bfloat16 as 2-byte voids (big_vision's `recover_dtype`)."""
  v = np.asarray(v)
  if v.dtype.kind == "V" and v.dtype.itemsize == 2:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return v.view(ml_dtypes.bfloat16)
  return v


def write(raw, path, export_config=None):
  """np.savez of the arrays to `path` (a .npz file; big_vision keeps no config file,
  so `export_config` is unused)."""
  del export_config
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in raw.items()})


def canonical(raw):
  """Strips a `params/` / `opt/target/` prefix and unrolls scanned blocks
  (`.../encoderblock/X` [depth, ...] -> `.../encoderblock_{i}/X`); float32."""
  out = {}
  for k, v in raw.items():
    for prefix in PREFIXES:
      if k.startswith(prefix):
        k = k[len(prefix):]
        break
    v = np.asarray(_recover_dtype(v), np.float32)
    match = _SCANNED.match(k)
    if match:
      for i in range(v.shape[0]):
        out[f"{match.group(1)}/encoderblock_{i}/{match.group(2)}"] = v[i]
    else:
      out[k] = v
  return out


def _depth(raw, prefix):
  n = 0
  while f"{prefix}encoderblock_{n}/LayerNorm_0/scale" in raw:
    n += 1
  return n


def native_image_size(raw) -> int:
  """The image side of the checkpoint's position grid."""
  raw = canonical(raw)
  patch = common.take(raw, "img/embedding/kernel", NAME).shape[0]
  n = common.take(raw, "img/pos_embedding", NAME).shape[1]
  return int(round(n ** 0.5)) * int(patch)


def model_config(raw, base_model_cfg=None):
  """`config.model` of the checkpoint (sizes from the arrays) on `base_model_cfg`
  (None: the defaults)."""
  raw = canonical(raw)
  take = lambda name: common.take(raw, name, NAME)
  conv = take("img/embedding/kernel")
  patch, channels, width = conv.shape[0], conv.shape[2], conv.shape[3]
  if channels != 3:
    raise errors.CheckpointError(f"{NAME}: the patch embedding takes {channels} "
                                 "channels; vlp_jax's ViT takes RGB (3).")
  if "img/MAPHead_0/probe" not in raw:
    raise errors.CheckpointError(f"{NAME}: the image tower has no MAP head "
                                 "(img/MAPHead_0); only SigLIP's MAP-pooled ViT is handled.")
  blk = "img/Transformer/encoderblock_0/"
  image = dict(width=int(width), patch_size=int(patch),
               depth=_depth(raw, "img/Transformer/"),
               mlp_dim=int(take(blk + "MlpBlock_0/Dense_0/kernel").shape[1]),
               num_heads=int(take(blk + f"{ATTN}/query/kernel").shape[1]))
  tok = take("txt/Embed_0/embedding")
  tblk = "txt/Encoder_0/encoderblock_0/"
  text = dict(vocab_size=int(tok.shape[0]), width=int(tok.shape[1]),
              depth=_depth(raw, "txt/Encoder_0/"),
              mlp_dim=int(take(tblk + "MlpBlock_0/Dense_0/kernel").shape[1]),
              num_heads=int(take(tblk + f"{ATTN}/query/kernel").shape[1]),
              context_length=int(take("txt/pos_embedding").shape[1]))
  img_dim = raw["img/head/kernel"].shape[1] if "img/head/kernel" in raw else width
  txt_dim = raw["txt/head/kernel"].shape[1] if "txt/head/kernel" in raw else tok.shape[1]
  if img_dim != txt_dim:
    raise errors.CheckpointError(f"{NAME}: the towers give {img_dim}-d (image) and "
                                 f"{txt_dim}-d (text) embeddings; they must agree.")
  return siglip_tree.model_config(
      base_model_cfg, image=image, text=text, embed_dim=img_dim,
      image_proj="img/head/kernel" in raw, text_proj="txt/head/kernel" in raw,
      logit_scale=take("t").reshape(()),
      logit_bias=raw["b"].reshape(()) if "b" in raw else None)


def _attn_entries(src, dst, heads):
  """Flax MultiHeadDotProductAttention (DenseGeneral kernels (W, H, hd), out
  (H, hd, W)) <-> vlp_jax's 2-D (W, W) kernels; the key bias is dropped."""
  to2d = lambda k: k.reshape(k.shape[0], -1)
  out2d = lambda k: k.reshape(-1, k.shape[-1])
  flat = lambda b: b.reshape(-1)
  split = lambda k: k.reshape(k.shape[0], heads, -1)
  split_b = lambda b: b.reshape(heads, -1)
  split_out = lambda k: k.reshape(heads, -1, k.shape[-1])
  entries = [Entry(f"{src}/{n}/kernel", dst + (m, "kernel"), to2d, split)
             for n, m in (("query", "query"), ("key", "key"), ("value", "value"))]
  entries += [Entry(f"{src}/{n}/bias", dst + (n, "bias"), flat, split_b)
              for n in ("query", "value")]
  entries += [Entry(f"{src}/out/kernel", dst + ("out", "kernel"), out2d, split_out),
              Entry(f"{src}/out/bias", dst + ("out", "bias"), same, same)]
  return entries


def _norm(src, dst):
  return [Entry(f"{src}/scale", dst + ("scale",), same, same),
          Entry(f"{src}/bias", dst + ("bias",), same, same)]


def _dense(src, dst):
  return [Entry(f"{src}/kernel", dst + ("kernel",), same, same),
          Entry(f"{src}/bias", dst + ("bias",), same, same)]


def _block(src, dst, heads):
  return (_norm(f"{src}/LayerNorm_0", dst + ("ln_attn",))
          + _attn_entries(f"{src}/{ATTN}", dst + ("attn",), heads)
          + _norm(f"{src}/LayerNorm_1", dst + ("ln_mlp",))
          + _dense(f"{src}/MlpBlock_0/Dense_0", dst + ("mlp", "fc1"))
          + _dense(f"{src}/MlpBlock_0/Dense_1", dst + ("mlp", "fc2")))


def plan(m):
  """(entries, dropped key-bias name -> shape) for `config.model` `m`."""
  img = builders.tower_kwargs(m.image, None)
  w, heads, patch = img["width"], img["num_heads"], img["patch_size"]
  theads = m.text.num_heads
  scalar = (lambda x: x.reshape(()), lambda x: x.reshape(1))
  entries = [
      Entry("img/embedding/kernel", ("img", "embedding", "kernel"),
            lambda k: k.reshape(-1, k.shape[-1]),
            lambda k: k.reshape(patch, patch, -1, k.shape[-1])),
      Entry("img/embedding/bias", ("img", "embedding", "bias"), same, same),
      Entry("img/pos_embedding", ("img", "pos_embedding"), same, same)]
  dropped = {}
  for i in range(img["depth"]):
    src = f"img/Transformer/encoderblock_{i}"
    entries += _block(src, ("img", "encoder", f"block_{i}"), heads)
    dropped[f"{src}/{ATTN}/key/bias"] = (heads, w // heads)
  entries += _norm("img/Transformer/encoder_norm", ("img", "encoder", "ln_final"))
  mh = ("img", "map_head")
  entries += [Entry("img/MAPHead_0/probe", mh + ("probe",), same, same)]
  entries += _attn_entries(f"img/MAPHead_0/{ATTN}", mh + ("attn",), heads)
  dropped[f"img/MAPHead_0/{ATTN}/key/bias"] = (heads, w // heads)
  entries += _norm("img/MAPHead_0/LayerNorm_0", mh + ("ln",))
  entries += _dense("img/MAPHead_0/MlpBlock_0/Dense_0", mh + ("mlp", "fc1"))
  entries += _dense("img/MAPHead_0/MlpBlock_0/Dense_1", mh + ("mlp", "fc2"))
  if m.image.get("proj", True):
    entries += _dense("img/head", ("img_proj", "proj"))
  entries += [
      Entry("txt/Embed_0/embedding", ("txt", "token_embedding", "embedding"), same, same),
      Entry("txt/pos_embedding", ("txt", "pos_embedding"), same, same)]
  for i in range(m.text.depth):
    src = f"txt/Encoder_0/encoderblock_{i}"
    entries += _block(src, ("txt", "encoder", f"block_{i}"), theads)
    dropped[f"{src}/{ATTN}/key/bias"] = (theads, m.text.width // theads)
  entries += _norm("txt/Encoder_0/encoder_norm", ("txt", "encoder", "ln_final"))
  if m.text.get("proj", True):
    entries += _dense("txt/head", ("txt_proj", "proj"))
  entries += [Entry("t", ("scale", "logit_scale"), *scalar)]
  if m.use_logit_bias:
    entries += [Entry("b", ("scale", "logit_bias"), *scalar)]
  return entries, dropped


def to_params(raw, model_cfg, image_size=None):
  """The two_tower params of `model_cfg` (from `model_config`); image positions are
  resized (bilinear; big_vision itself uses scipy's zoom, order 1, so a resized grid
  is close to, not equal to, big_vision's) when `image_size` gives another patch grid
  than the checkpoint's."""
  entries, dropped = plan(model_cfg)
  params = siglip_tree.import_tree(canonical(raw), entries, dropped, NAME)
  return siglip_tree.finish_import(params, model_cfg, image_size, "bilinear")


def from_params(params, model_cfg):
  """big_vision arrays of two_tower `params` (projections without bias get zero
  biases: big_vision's heads always have one)."""
  m = model_cfg
  siglip_tree.check_exportable(m, NAME)
  params = siglip_tree.canonical(params)
  for tower, proj in (("image", "img_proj"), ("text", "txt_proj")):
    if m[tower].get("proj", True):
      params[proj]["proj"].setdefault("bias", np.zeros((m.embed_dim,), np.float32))
  entries, dropped = plan(m)
  return siglip_tree.export_flat(params, entries, dropped)


interop.register(NAME)(sys.modules[__name__])
