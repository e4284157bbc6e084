"""What every weight format shares: reading and writing files (safetensors; torch
pickles without torch), position-embedding resizing, the transformer-block and
patch-embedding mappings between torch's layout and vlp_jax's, and the scan/fused
parameter layouts.

Layout of a vlp_jax block (`layers.Block`), unrolled and unfused ("canonical"):
  ln_attn/{scale,bias}  attn/{query,value}/{kernel,bias}  attn/key/kernel
  attn/out/{kernel,bias}  ln_mlp/{scale,bias}  mlp/fc1/{kernel,bias}  mlp/fc2/{...}
Kernels are (in, out): torch's Linear weight (out, in) transposed. The attention key
bias of a checkpoint is dropped on import: it adds q.b_k to every logit of a query's
row, which softmax cancels, so the function is unchanged (tests/test_interop_clip.py
checks this against a reference model with non-zero key biases); export writes zeros.
"""
import collections
import os
import pickle
import zipfile

import numpy as np
from flax import traverse_util

from vlp_jax import errors

TORCH_EXTRA = "pip install 'vlp_jax[torch]'"


# ----------------------------------------------------------------------------- files

class Arrays(dict):
  """A checkpoint's flat arrays (name -> np.ndarray) and `meta`: what came with them
  (e.g. a Hugging Face config.json), for `model_config`."""

  def __init__(self, *args, meta=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.meta = meta or {}


def check_file(path: str, what: str) -> str:
  """`path` if it is an existing file, else a DataPathError naming `what`."""
  if not path or not os.path.isfile(path):
    raise errors.DataPathError(f"{what}: no file at {path!r}; give the path of a "
                               "downloaded checkpoint (nothing is downloaded).")
  return path


def read_safetensors(path: str) -> dict:
  """The arrays of a .safetensors file (a DataPathError if there is none)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return dict(load_file(check_file(path, "safetensors weights")))


def write_safetensors(raw: dict, path: str, metadata=None) -> None:
  """Writes flat arrays as safetensors, shapes kept (a 0-d array stays 0-d:
  `np.ascontiguousarray` would make it (1,))."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.require(v, requirements="C") for k, v in raw.items()}, path,
            metadata=metadata)


def read_any(path: str) -> dict:
  """Flat arrays of a .safetensors file or a torch pickle (.bin/.pt/.pth)."""
  check_file(path, "weights")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch(path)


_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _bfloat16():
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return ml_dtypes.bfloat16


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not size:
    return storage[offset].copy()
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                         tuple(s * item for s in stride))
  return np.array(view)


class _TorchUnpickler(pickle.Unpickler):
  """Reads a torch.save zip archive of tensors (a state dict) into NumPy arrays.
  Restricted: only dicts, tensors and parameters; anything else (a pickled module,
  a TorchScript archive) is refused."""

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, *unused: data
    if module == "torch" and name in _STORAGES:
      return _STORAGES[name]
    if module == "torch" and name == "BFloat16Storage":
      return _bfloat16()
    raise pickle.UnpicklingError(f"{module}.{name} is not a tensor")

  def persistent_load(self, pid):
    _, dtype, key, _, _ = pid
    data = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(data, np.dtype(dtype))


def _read_torch_zip(path):
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1 or any(n.endswith("/constants.pkl") for n in z.namelist()):
      raise pickle.UnpicklingError("not a plain torch.save archive")
    prefix = pkl[0][:-len("/data.pkl")]
    with z.open(pkl[0]) as f:
      return _TorchUnpickler(f, z, prefix).load()


def read_torch(path: str) -> dict:
  """A torch checkpoint (.bin/.pt) as flat NumPy arrays.

  A plain `torch.save` zip archive of tensors is read without torch. TorchScript
  archives (OpenAI's .pt files), legacy pickles and pickled objects need torch
  (`vlp_jax[torch]`); a {'state_dict': ...} wrapper is unwrapped and 'module.'
  prefixes are stripped."""
  check_file(path, "torch weights")
  tree = None
  if zipfile.is_zipfile(path):
    try:
      tree = _read_torch_zip(path)
    except (pickle.UnpicklingError, KeyError, ValueError, AttributeError):
      tree = None
  if tree is None:
    tree = _read_with_torch(path)
  if isinstance(tree, dict) and "state_dict" in tree and isinstance(tree["state_dict"], dict):
    tree = tree["state_dict"]
  if not isinstance(tree, dict):
    raise errors.DataError(f"{path}: expected a state dict of tensors, got "
                           f"{type(tree).__name__}.")
  out = {}
  for k, v in tree.items():
    k = k[len("module."):] if k.startswith("module.") else k
    out[k] = v if isinstance(v, np.ndarray) else np.asarray(v)
  return out


def _read_with_torch(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise errors.DataError(
        f"{path} is a TorchScript archive or a legacy torch pickle, which only torch can "
        f"read: install the extra ({TORCH_EXTRA}), or convert it to .safetensors "
        "elsewhere (tools/convert_weights.py reads .safetensors without torch).") from None
  try:
    tree = torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # pylint: disable=broad-except
    tree = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's jit .pt.
  tree = tree.get("state_dict", tree) if isinstance(tree, dict) else tree
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in tree.items() if hasattr(v, "numpy")}


# ------------------------------------------------------------- position resizing

def _aa_weights(in_size, out_size, kind):
  """[out, in] interpolation matrix of torch's antialiased resize
  (F.interpolate(..., align_corners=False, antialias=True)), as PIL: bicubic with
  a = -0.5 (support 2) or bilinear (support 1), the filter widened by the
  downscaling factor, weights normalised per output."""
  def cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return (((x - 5) * x + 8) * x - 4) * a
    return 0.0
  filt, half = (cubic, 2.0) if kind == "bicubic" else (lambda x: max(0.0, 1 - abs(x)), 1.0)
  scale = in_size / out_size
  support = half * scale if scale >= 1.0 else half
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = np.array([filt((j - center + 0.5) * invscale) for j in range(lo, hi)])
    m[i, lo:hi] = w / w.sum() if w.sum() else w
  return m


def _torch_bicubic_weights(in_size, out_size, a=-0.75):
  """[out, in] interpolation matrix of torch's F.interpolate(mode='bicubic',
  align_corners=False) without antialias: source x = (i + 0.5) * in / out - 0.5
  (in float32, as torch);
  Keys' cubic with a = -0.75 on the 4 neighbours, indices clamped to the border."""
  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0
  f = np.float32  # torch computes the source index in float32.
  scale = f(in_size) / f(out_size)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = f(scale * f(i + 0.5) - f(0.5))
    x0 = int(np.floor(src))
    t = float(f(src - x0))
    for k, w in zip(range(x0 - 1, x0 + 3), (cubic(t + 1), cubic(t), cubic(1 - t),
                                            cubic(2 - t))):
      m[i, min(max(k, 0), in_size - 1)] += w
  return m


# resize_grid kinds: 'bicubic' / 'bilinear' are open_clip's (antialiased, as PIL);
# 'torch_bicubic' is HF's interpolate_pos_encoding (plain F.interpolate bicubic).
RESIZE_KINDS = ("bicubic", "bilinear", "torch_bicubic")


def resize_grid(pos, new_grid, kind: str = "bicubic"):
  """[gh*gw, W] (square gh = gw) position embeddings -> [new_h*new_w, W].

  kind 'bicubic' / 'bilinear': open_clip's `resize_pos_embed` (antialias=True,
  align_corners=False; PIL's filters, bicubic a = -0.5); 'torch_bicubic': torch's
  F.interpolate(mode='bicubic', align_corners=False) without antialias (a = -0.75),
  as HF SigLIP's `interpolate_pos_encoding`. A class token's position is not part
  of `pos`."""
  pos = np.asarray(pos, np.float32)
  n, width = pos.shape
  g = int(round(n ** 0.5))
  if g * g != n:
    raise errors.CheckpointError(f"position embeddings of {n} patches are not a square "
                                 "grid; cannot resize them.")
  new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  if (new_h, new_w) == (g, g):
    return pos
  if kind not in RESIZE_KINDS:
    raise ValueError(f"resize kind {kind!r} is not one of {RESIZE_KINDS}.")
  if kind == "torch_bicubic":
    mh, mw = _torch_bicubic_weights(g, new_h), _torch_bicubic_weights(g, new_w)
  else:
    mh, mw = _aa_weights(g, new_h, kind), _aa_weights(g, new_w, kind)
  grid = pos.reshape(g, g, width).astype(np.float64)
  out = np.einsum("ih,hwc,jw->ijc", mh, grid, mw)
  return out.reshape(new_h * new_w, width).astype(np.float32)


# ------------------------------------------------------------ block mappings

def f32(x):
  """`x` as a float32 NumPy array."""
  return np.asarray(x, np.float32)


def block_to_params(a: dict) -> dict:
  """A canonical vlp_jax block from torch-layout arrays named ln1_w ln1_b wq bq wk
  (bk dropped) wv bv wo bo ln2_w ln2_b w1 b1 w2 b2 (Linear weights are (out, in))."""
  t = lambda w: f32(w).T
  return {
      "ln_attn": {"scale": f32(a["ln1_w"]), "bias": f32(a["ln1_b"])},
      "attn": {"query": {"kernel": t(a["wq"]), "bias": f32(a["bq"])},
               "key": {"kernel": t(a["wk"])},
               "value": {"kernel": t(a["wv"]), "bias": f32(a["bv"])},
               "out": {"kernel": t(a["wo"]), "bias": f32(a["bo"])}},
      "ln_mlp": {"scale": f32(a["ln2_w"]), "bias": f32(a["ln2_b"])},
      "mlp": {"fc1": {"kernel": t(a["w1"]), "bias": f32(a["b1"])},
              "fc2": {"kernel": t(a["w2"]), "bias": f32(a["b2"])}},
  }


def block_from_params(p: dict) -> dict:
  """The inverse of `block_to_params` (bk = zeros)."""
  t = lambda w: f32(w).T
  at = p["attn"]
  return dict(ln1_w=f32(p["ln_attn"]["scale"]), ln1_b=f32(p["ln_attn"]["bias"]),
              wq=t(at["query"]["kernel"]), bq=f32(at["query"]["bias"]),
              wk=t(at["key"]["kernel"]), bk=np.zeros_like(f32(at["query"]["bias"])),
              wv=t(at["value"]["kernel"]), bv=f32(at["value"]["bias"]),
              wo=t(at["out"]["kernel"]), bo=f32(at["out"]["bias"]),
              ln2_w=f32(p["ln_mlp"]["scale"]), ln2_b=f32(p["ln_mlp"]["bias"]),
              w1=t(p["mlp"]["fc1"]["kernel"]), b1=f32(p["mlp"]["fc1"]["bias"]),
              w2=t(p["mlp"]["fc2"]["kernel"]), b2=f32(p["mlp"]["fc2"]["bias"]))


def ln_params(raw: dict, prefix: str, fmt: str) -> dict:
  """{scale, bias} of the LayerNorm arrays `prefix`.weight / `prefix`.bias."""
  return {"scale": f32(take(raw, prefix + ".weight", fmt)),
          "bias": f32(take(raw, prefix + ".bias", fmt))}


def ln_arrays(ln: dict, prefix: str) -> dict:
  """The inverse of `ln_params`: {prefix.weight, prefix.bias}."""
  return {prefix + ".weight": f32(ln["scale"]), prefix + ".bias": f32(ln["bias"])}


def encoder_to_params(raw: dict, prefix: str, final_ln: str, fmt: str,
                      read_block) -> dict:
  """A canonical vlp_jax encoder {block_i, ln_final} from the blocks `prefix{i}.`
  of a torch-layout checkpoint; `read_block(raw, block_prefix)` gives one block's
  arrays as `block_to_params` takes them."""
  enc = {f"block_{i}": block_to_params(read_block(raw, f"{prefix}{i}."))
         for i in range(count_blocks(raw, prefix))}
  enc["ln_final"] = ln_params(raw, final_ln, fmt)
  return enc


def encoder_from_params(enc: dict, prefix: str, final_ln: str, write_block) -> dict:
  """The inverse of `encoder_to_params`: `write_block(arrays, block_prefix)` names
  one block's `block_from_params` arrays."""
  raw = {}
  for i in range(sum(1 for k in enc if k.startswith("block_"))):
    raw.update(write_block(block_from_params(enc[f"block_{i}"]), f"{prefix}{i}."))
  raw.update(ln_arrays(enc["ln_final"], final_ln))
  return raw


def patch_embed_to_params(conv_w, class_emb, pos, grid, kind="bicubic") -> dict:
  """ViT stem params {embedding, cls, pos_embedding} from a conv patch embedding
  (out, C, p, p) without bias, a class embedding (W,) and positions (1 + N, W).

  vlp_jax's class token has no position: position 0 is folded into `cls` (exact:
  the sum is what the original computes). Patch positions are resized to `grid`
  (`resize_grid`) if the checkpoint's grid differs."""
  conv_w = f32(conv_w)
  width, c, p, _ = conv_w.shape
  # Our patches are (p1 p2 c)-flattened NHWC pixels: kernel[(i, j, ch), o].
  kernel = conv_w.transpose(2, 3, 1, 0).reshape(p * p * c, width)
  pos = f32(pos)
  return {"embedding": {"kernel": kernel, "bias": np.zeros((width,), np.float32)},
          "cls": (f32(class_emb) + pos[0]).reshape(1, 1, width),
          "pos_embedding": resize_grid(pos[1:], grid, kind)[None]}


def patch_embed_from_params(p: dict, patch: int, channels: int = 3):
  """(conv weight (W, C, p, p), class embedding (W,), positions (1 + N, W)): the
  inverse of `patch_embed_to_params`; position 0 is zero and our embedding bias is
  folded into the patch positions."""
  kernel = f32(p["embedding"]["kernel"])
  width = kernel.shape[1]
  conv = kernel.reshape(patch, patch, channels, width).transpose(3, 2, 0, 1)
  pos = f32(p["pos_embedding"])[0] + f32(p["embedding"]["bias"])[None]
  pos = np.concatenate([np.zeros((1, width), np.float32), pos], axis=0)
  return np.ascontiguousarray(conv), f32(p["cls"]).reshape(width), pos


# -------------------------------------------------------------- param layouts

def _blocks(encoder):
  n = sum(1 for k in encoder if k.startswith("block_"))
  return [encoder[f"block_{i}"] for i in range(n)]


def _fuse(block):
  at = block["attn"]
  if "qkv_kernel" in at:
    return block
  kernel = np.stack([at[k]["kernel"] for k in ("query", "key", "value")], axis=1)
  bias = np.stack([at["query"]["bias"], at["value"]["bias"]])
  return dict(block, attn={"qkv_kernel": kernel, "qv_bias": bias, "out": at["out"]})


def _unfuse(block):
  at = block["attn"]
  if "qkv_kernel" not in at:
    return block
  k, b = f32(at["qkv_kernel"]), f32(at["qv_bias"])
  return dict(block, attn={"query": {"kernel": k[:, 0], "bias": b[0]},
                           "key": {"kernel": k[:, 1]},
                           "value": {"kernel": k[:, 2], "bias": b[1]}, "out": at["out"]})


def _map_encoders(tree, fn):
  """Applies fn(encoder dict) to every `encoder` node (the towers' transformers)."""
  if not isinstance(tree, dict):
    return tree
  return {k: fn(v) if k == "encoder" else _map_encoders(v, fn) for k, v in tree.items()}


def to_layout(params: dict, model_cfg) -> dict:
  """Canonical params (unrolled `block_i`, unfused) -> the layout of `model_cfg`:
  `fused_qkv` (self-attention qkv_kernel / qv_bias) and `scan_layers` (blocks stacked
  under `layers/block` with a leading layer axis)."""
  fused, scan = model_cfg.get("fused_qkv", False), model_cfg.get("scan_layers", False)

  def fn(enc):
    blocks = _blocks(enc)
    if fused:
      blocks = [_fuse(b) for b in blocks]
    rest = {k: v for k, v in enc.items() if not k.startswith("block_")}
    if scan:
      flat = [traverse_util.flatten_dict(b) for b in blocks]
      stacked = {k: np.stack([f[k] for f in flat]) for k in flat[0]}
      return dict(rest, layers={"block": traverse_util.unflatten_dict(stacked)})
    return dict(rest, **{f"block_{i}": b for i, b in enumerate(blocks)})
  return _map_encoders(params, fn)


def from_layout(params: dict) -> dict:
  """The inverse of `to_layout` (any layout -> canonical), as NumPy float32."""
  params = traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})

  def fn(enc):
    enc = dict(enc)
    if "layers" in enc:
      flat = traverse_util.flatten_dict(enc.pop("layers")["block"])
      depth = next(iter(flat.values())).shape[0]
      for i in range(depth):
        enc[f"block_{i}"] = traverse_util.unflatten_dict({k: v[i] for k, v in flat.items()})
    for k in [k for k in enc if k.startswith("block_")]:
      enc[k] = _unfuse(enc[k])
    return enc
  return _map_encoders(params, fn)


def count_blocks(raw: dict, prefix: str) -> int:
  """How many `prefix{i}.` blocks the flat names contain (0, 1, ... contiguous)."""
  n = 0
  while any(k.startswith(f"{prefix}{n}.") for k in raw):
    n += 1
  return n


def take(raw: dict, name: str, fmt: str):
  """raw[name], or a CheckpointError saying the checkpoint is not of format `fmt`."""
  if name not in raw:
    raise errors.CheckpointError(
        f"{fmt} weights: no array {name!r} (have {len(raw)} arrays, e.g. "
        f"{sorted(raw)[:5]}); is this file of another format (see "
        "vlp_jax/interop/ and --from / config.init_from.format)?")
  return raw[name]


def clip_heads(m) -> None:
  """Sets CLIP's heads on model config `m`: bias-free projections of both towers, no
  FILIP token projections or prefix conditioning (a recipe's may differ)."""
  m.token_embed_dim = 0
  m.text.prefix_conditioning = False
  if "proj_bias" in m:
    m.proj_bias = False
  for tower in ("image", "text"):
    if "proj" in m[tower]:
      m[tower].proj = True


def default_model():
  """The default `config.model` (what `model_config` builds on without a base)."""
  from vlp_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.default_config().model


def check_clip_exportable(model_cfg, fmt: str) -> None:
  """A ConfigError listing what `config.model` has that a CLIP of format `fmt`
  (open_clip, OpenAI, HF CLIP: ViT with class token, causal text tower pooled at the
  end token, bias-free projections) cannot represent."""
  problems = []
  if model_cfg.image.pool != "cls":
    problems.append(f"model.image.pool={model_cfg.image.pool!r} (needs 'cls')")
  if not model_cfg.text.causal or model_cfg.text.pool not in ("argmax", "eos"):
    problems.append("a causal text tower pooled at the end token (text.causal=True, "
                    "text.pool='argmax' or 'eos')")
  if model_cfg.get("token_embed_dim", 0):
    problems.append(f"model.token_embed_dim={model_cfg.token_embed_dim} (FILIP token "
                    "projections)")
  if model_cfg.text.get("prefix_conditioning", False):
    problems.append("model.text.prefix_conditioning")
  if model_cfg.get("proj_bias", False):
    problems.append("model.proj_bias=True (CLIP projections have no bias)")
  for tower in ("image", "text"):
    if not model_cfg[tower].get("proj", True):
      problems.append(f"model.{tower}.proj=False (CLIP towers have a projection)")
  if model_cfg.name != "two_tower":
    problems.append(f"model.name={model_cfg.name!r} (needs 'two_tower')")
  if problems:
    raise errors.ConfigError(f"cannot export to {fmt}: " + "; ".join(problems) + ".")


def grid_of(image_size: int, patch: int) -> int:
  """Patches per side at `image_size` (a ConfigError if `patch` does not divide it)."""
  if image_size % patch:
    raise errors.ConfigError(f"image size {image_size} is not divisible by the "
                             f"checkpoint's patch size {patch}.")
  return image_size // patch
