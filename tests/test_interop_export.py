"""Exported files as the original libraries write them (vlp_jax/interop/): every
array's name, shape (a 0-d `logit_scale` stays 0-d) and dtype equal the fixture files
the libraries wrote; HF configs agree with transformers'; HF SigLIP's position resize;
hf_clip's token ids; one list of format names."""
import json
import os
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from vlp_jax import config as config_lib
from vlp_jax import errors, interop
from vlp_jax.interop import big_vision, common, hf_clip

F = os.path.join(os.path.dirname(__file__), "fixtures", "interop")
CLIP_HEADS = dict(image_heads=2, text_heads=2)
# format -> (path to import, the file the library wrote, load options, export name).
CASES = {
    "open_clip": ("clip/open_clip.safetensors", "clip/open_clip.safetensors", CLIP_HEADS,
                  "out.safetensors"),
    "openai": ("clip/openai.safetensors", "clip/openai.safetensors", CLIP_HEADS,
               "out.safetensors"),
    "hf_clip": ("clip/hf_clip", "clip/hf_clip/model.safetensors", {}, "hf"),
    "hf_siglip": ("siglip", "siglip/model.safetensors", {}, "hf"),
    "big_vision": ("siglip/big_vision.npz", "siglip/big_vision.npz", {}, "bv.npz"),
    "open_clip_coca": ("coca/coca.safetensors", "coca/coca.safetensors",
                       dict(image_heads=3, text_heads=2, pool_heads=4), "out.safetensors"),
}
# Buffers the libraries save that are not parameters (export leaves them out).
BUFFERS = ("position_ids", "attn_mask")


def _read_raw(path):
  """The file's arrays as stored (no vlp_jax reader: shapes and dtypes as written)."""
  if path.endswith(".npz"):
    with np.load(path) as npz:
      return {k: npz[k] for k in npz.files}
  if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
  return load_file(path)


def _export(fmt, tmp_path):
  src, _, opts, out = CASES[fmt]
  model_cfg, params, size = interop.load(fmt, os.path.join(F, src), **opts)
  path = str(tmp_path / out)
  interop.save(fmt, params, model_cfg, path, size)
  return path, model_cfg, size


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_exported_arrays_have_the_original_names_shapes_and_dtypes(fmt, tmp_path):
  path, _, _ = _export(fmt, tmp_path)
  got = _read_raw(path)
  want = _read_raw(os.path.join(F, CASES[fmt][1]))
  if fmt == "big_vision":  # Export writes blocks unrolled, as the published files.
    want = {k: np.asarray(want[k]) for k in want}
    unrolled = big_vision.canonical(want)
    want = {k: v.astype(np.float32) for k, v in unrolled.items()}
  want = {k: v for k, v in want.items() if not k.endswith(BUFFERS)}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].shape == v.shape and got[k].dtype == v.dtype, (k, got[k].shape, v.shape)
  scale = {"open_clip": "logit_scale", "openai": "logit_scale", "hf_clip": "logit_scale",
           "open_clip_coca": "logit_scale", "hf_siglip": "logit_scale",
           "big_vision": "t"}[fmt]
  assert got[scale].shape == {"hf_siglip": (1,), "big_vision": (1,)}.get(fmt, ())


def test_write_safetensors_keeps_0d_arrays(tmp_path):
  path = str(tmp_path / "x.safetensors")
  common.write_safetensors({"s": np.float32(2.5), "v": np.arange(3.0)[::2]}, path)
  back = load_file(path)
  assert back["s"].shape == () and float(back["s"]) == 2.5
  np.testing.assert_array_equal(back["v"], [0.0, 2.0])


def _hf_fields_agree(exported, original):
  """Every field of `exported` that transformers' config.json also has is equal
  (top level and the two tower sections)."""
  for key, value in exported.items():
    if key.endswith("_config"):
      for field, v in value.items():
        # A tower's projection_dim: CLIPModel reads the top-level one; the fixture's
        # towers keep transformers' default 512, ours (for CLIP*ModelWithProjection)
        # the model's.
        if field in original[key] and field != "projection_dim":
          assert original[key][field] == v, (key, field, v, original[key][field])
    elif key in original:
      assert original[key] == value, (key, value, original[key])


@pytest.mark.parametrize("fmt,folder", [("hf_clip", "clip/hf_clip"),
                                        ("hf_siglip", "siglip")])
def test_exported_hf_config_matches_transformers(fmt, folder, tmp_path):
  path, _, _ = _export(fmt, tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    exported = json.load(f)
  with open(os.path.join(F, folder, "config.json")) as f:
    original = json.load(f)
  _hf_fields_agree(exported, original)
  for tower in ("text_config", "vision_config"):
    # The fields a model's function depends on are all written.
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "hidden_act", "layer_norm_eps"):
      assert field in exported[tower], (tower, field)
  if fmt == "hf_clip":
    for field in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size",
                  "max_position_embeddings"):
      assert exported["text_config"][field] == original["text_config"][field], field
    assert exported["vision_config"]["image_size"] == original["vision_config"]["image_size"]


# ------------------------------------------------------------ hf_clip token ids

@pytest.fixture(scope="module")
def clip_cfg():
  return interop.load("hf_clip", os.path.join(F, "clip", "hf_clip"))[0]


def test_hf_clip_writes_the_tokenizers_ids(clip_cfg):
  ids = dict(bos=5, eos=63, pad=0, vocab_size=64)
  text = hf_clip.export_config(clip_cfg, 16, token_ids=ids)["text_config"]
  assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (5, 63, 0)
  # Without a tokenizer: CLIP's convention (EOS the highest id).
  text = hf_clip.export_config(clip_cfg, 16)["text_config"]
  assert (text["bos_token_id"], text["eos_token_id"]) == (62, 63)


@pytest.mark.parametrize("pool", ["argmax", "eos"])
def test_hf_clip_refuses_a_tokenizer_whose_eos_is_not_the_highest_id(clip_cfg, pool):
  m = clip_cfg.copy_and_resolve_references()
  m.text.pool = pool
  bytes_like = dict(bos=1, eos=2, pad=0, vocab_size=64)  # HF: argmax pooling for id 2.
  with pytest.raises(errors.ConfigError, match="end-of-text id 2 is not its highest"):
    hf_clip.export_config(m, 16, token_ids=bytes_like)
  with pytest.raises(errors.ConfigError, match="end-of-text id 40 is not its highest"):
    hf_clip.export_config(m, 16, token_ids=dict(bos=1, eos=40, pad=0, vocab_size=64))
  if pool == "eos":
    with pytest.raises(errors.ConfigError, match="pads with its end-of-text"):
      hf_clip.export_config(m, 16, token_ids=dict(bos=1, eos=63, pad=63, vocab_size=64))


def test_convert_weights_takes_the_ids_from_the_runs_tokenizer(tmp_path):
  """--from=vlp_jax --to=hf_clip: the run's tokenizer decides the ids; the bytes
  tokenizer (EOS 2, not its highest id) is refused; a tokenizer that cannot be
  built falls back to CLIP's convention with a warning."""
  from tools import convert_weights  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "vj")
  convert_weights.convert("hf_clip", os.path.join(F, "clip", "hf_clip"), "vlp_jax", out)
  assert convert_weights.token_ids("bytes", 64)["eos"] == 2
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  for spec, ok in (("bytes", False), ("words:/nonexistent/vocab.txt", True)):
    cfg["data"]["tokenizer"] = spec
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(cfg, f)
    dst = str(tmp_path / spec.split(":")[0])
    if ok:
      with pytest.warns(UserWarning, match="cannot build the tokenizer"):
        convert_weights.convert("vlp_jax", out, "hf_clip", dst)
      with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["text_config"]["eos_token_id"] == 63
    else:
      with pytest.raises(errors.ConfigError, match="not its highest id"):
        convert_weights.convert("vlp_jax", out, "hf_clip", dst)


# ------------------------------------------------------------ position resizing

def test_torch_bicubic_resize_matches_torch():
  """kind 'torch_bicubic' = torch F.interpolate(bicubic, align_corners=False), no
  antialias (HF SigLIP's interpolate_pos_encoding), on up / down / non-square grids;
  open_clip's antialiased kind is a different function."""
  ref = np.load(os.path.join(F, "resize_torch_bicubic.npz"))
  for i in range(4):
    pos, size, want = ref[f"pos_{i}"], tuple(int(x) for x in ref[f"size_{i}"]), ref[f"out_{i}"]
    got = common.resize_grid(pos, size, "torch_bicubic")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6, i
    assert np.abs(common.resize_grid(pos, size, "bicubic") - want).max() > 1e-2
  with pytest.raises(ValueError, match="torch_bicubic"):
    common.resize_grid(ref["pos_0"], 6, "nearest")


def test_hf_siglip_import_resizes_as_hf():
  from vlp_jax.interop import hf_siglip  # pylint: disable=import-outside-toplevel
  raw = hf_siglip.read(os.path.join(F, "siglip"))
  m = hf_siglip.model_config(raw)
  pos = raw["vision_model.embeddings.position_embedding.weight"]
  got = hf_siglip.to_params(raw, m, 48)["img"]["pos_embedding"][0]
  np.testing.assert_array_equal(got, common.resize_grid(pos, 6, "torch_bicubic"))


# ------------------------------------------------------------ format names

def test_one_list_of_format_names():
  assert sorted(config_lib.INIT_FROM_FORMATS) == interop.names()
  assert sorted(interop.MODULES) == interop.names()
  for name, module in interop.MODULES.items():
    fmt = interop.FORMATS[name]
    where = fmt.__name__ if isinstance(fmt, types.ModuleType) else type(fmt).__module__
    assert where == f"vlp_jax.interop.{module}", name
