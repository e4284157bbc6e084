"""CLIP-family weight interop (vlp_jax/interop/open_clip.py, hf_clip.py, common.py):
numerical parity with the original libraries on tiny random models (fixtures made by
tools/make_interop_fixtures.py with torch / open_clip / transformers; not needed here),
exact export round trips, param layouts, position resizing, errors."""
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.interop_helpers import (assert_exported_array, flat, jitted_forward,
                                   param_shapes)
from vlp_jax import config as config_lib
from vlp_jax import errors, interop
from vlp_jax.interop import common
from vlp_jax.models import text, two_tower

D = os.path.join(os.path.dirname(__file__), "fixtures", "interop", "clip")
HEADS = dict(image_heads=2, text_heads=2)  # The open_clip fixtures' (not 64-wide) heads.
# name -> (format, weights, reference outputs, model_config options)
CASES = {
    "open_clip": ("open_clip", "open_clip.safetensors", "open_clip_ref.npz", HEADS),
    "openai": ("openai", "openai.safetensors", "openai_ref.npz", HEADS),
    "hf_clip": ("hf_clip", "hf_clip", "hf_clip_ref.npz", {}),
}
TOL = 1e-5


def _load(case, **kw):
  fmt, path, _, opts = CASES[case]
  return interop.load(fmt, os.path.join(D, path), **dict(opts, **kw))


@pytest.fixture(scope="module")
def forward():
  """One jitted forward per model config: (cfg, params, ref) -> outputs, logits."""
  def make_fn(cfg):
    model = two_tower.TwoTower(cfg, jnp.float32)

    def fn(p, images, tokens):
      out = model.apply({"params": p}, {"image": images, "text": tokens})
      return out, out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
    return fn
  return jitted_forward(make_fn)


def _max_diffs(out, logits, ref):
  return {"image_emb": float(np.abs(np.asarray(out["image_emb"]) - ref["image_emb"]).max()),
          "text_emb": float(np.abs(np.asarray(out["text_emb"]) - ref["text_emb"]).max()),
          "logits": float(np.abs(np.asarray(logits) - ref["logits"]).max())}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_the_original_library(case, forward):
  cfg, params, size = _load(case)
  assert size == 16
  ref = np.load(os.path.join(D, CASES[case][2]))
  diffs = _max_diffs(*forward(cfg, params, ref), ref)
  assert max(diffs.values()) <= TOL, diffs


def test_parity_check_can_fail(forward):
  """The same weights with another activation (QuickGELU -> exact GELU) are far off."""
  cfg, params, _ = _load("openai")
  ref = np.load(os.path.join(D, CASES["openai"][2]))
  cfg.mlp_act = "gelu"
  assert max(_max_diffs(*forward(cfg, params, ref), ref).values()) > 10 * TOL


def test_reference_models_have_nonzero_key_biases():
  """The parity above holds with non-zero key biases, which import drops (exact)."""
  raw = common.read_any(os.path.join(D, "open_clip.safetensors"))
  b = raw["visual.transformer.resblocks.0.attn.in_proj_bias"]
  w = b.shape[0] // 3
  assert np.abs(b[w:2 * w]).min() > 1e-4
  hf = common.read_any(os.path.join(D, "hf_clip", "model.safetensors"))
  assert np.abs(hf["text_model.encoder.layers.1.self_attn.k_proj.bias"]).min() > 1e-4
  assert np.abs(hf["vision_model.embeddings.class_embedding"]).min() > 0


def test_model_config_inferred_from_the_arrays():
  cfg, _, _ = _load("open_clip")
  im, tx = cfg.image, cfg.text
  assert (im.width, im.depth, im.mlp_dim, im.patch_size, im.num_heads) == (16, 2, 32, 4, 2)
  assert (tx.width, tx.depth, tx.mlp_dim, tx.vocab_size, tx.context_length) == (
      24, 2, 48, 64, 16)
  assert cfg.embed_dim == 24 and im.ln_pre and not tx.padding_mask
  assert (cfg.mlp_act, cfg.layer_norm_eps, tx.pool) == ("gelu", 1e-5, "argmax")
  assert _load("openai")[0].mlp_act == "quick_gelu"
  hf, _, _ = _load("hf_clip")  # heads from config.json
  assert (hf.image.num_heads, hf.text.num_heads, hf.text.mlp_dim) == (4, 2, 40)
  c = config_lib.default_config()
  c.model = cfg
  config_lib.validate(c)
  base = config_lib.default_config().model  # A recipe's own heads are replaced.
  base.token_embed_dim, base.text.prefix_conditioning = 256, True
  base.proj_bias, base.image.proj = True, False
  cfg_b, _, _ = _load("open_clip", base_model_cfg=base)
  assert (cfg_b.token_embed_dim, cfg_b.text.prefix_conditioning, cfg_b.proj_bias,
          cfg_b.image.proj) == (0, False, False, True)
  with pytest.raises(errors.ConfigError, match="head_dim"):  # 16 wide: no 64-wide heads.
    interop.load("open_clip", os.path.join(D, "open_clip.safetensors"))


def test_torch_bin_read_without_torch():
  """torch.save's zip layout: strided views, float16, bfloat16, 0-d tensors."""
  got = common.read_any(os.path.join(D, "torch_layouts.bin"))
  sd = common.read_any(os.path.join(D, "open_clip.safetensors"))
  np.testing.assert_array_equal(got["strided_t"],
                                sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].T)
  assert got["half"].dtype == np.float16 and got["bf16"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(got["half"], sd["visual.proj"].astype(np.float16))
  np.testing.assert_array_equal(got["bf16"], sd["visual.proj"].astype(got["bf16"].dtype))
  np.testing.assert_array_equal(got["scalar"], sd["logit_scale"])
  np.testing.assert_array_equal(got["text_projection"], sd["text_projection"])


@pytest.mark.parametrize("case", ["open_clip", "hf_clip"])
def test_export_round_trip_is_exact(case):
  fmt_name, path, _, opts = CASES[case]
  fmt = interop.get(fmt_name)
  raw = fmt.read(os.path.join(D, path))
  cfg = fmt.model_config(raw, None, **opts)
  params = fmt.to_params(raw, cfg, 16)
  out = fmt.from_params(params, cfg)
  assert sorted(out) == sorted(k for k in raw if "position_ids" not in k)
  cls_key, pos_key = {
      "open_clip": ("visual.class_embedding", "visual.positional_embedding"),
      "hf_clip": ("vision_model.embeddings.class_embedding",
                  "vision_model.embeddings.position_embedding.weight")}[case]
  for k in out:
    if k not in (cls_key, pos_key):
      assert_exported_array(k, out[k], raw[k])
  # Class position folded into the class embedding: the same sum, position 0 zero.
  np.testing.assert_array_equal(out[pos_key][1:], raw[pos_key][1:])
  np.testing.assert_array_equal(out[pos_key][0], 0)
  np.testing.assert_array_equal(out[cls_key], raw[cls_key] + raw[pos_key][0])
  # Export then import is exact.
  again = fmt.to_params(out, cfg, 16)
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(again)[k], v, err_msg=k)


def test_export_folds_the_embedding_bias_into_positions(forward):
  """A trained model's patch-embedding bias (imports have none) goes into positions."""
  cfg, params, _ = _load("open_clip")
  params = jax.tree.map(np.array, params)
  params["img"]["embedding"]["bias"] = np.linspace(-1, 1, 16).astype(np.float32)
  fmt = interop.get("open_clip")
  back = fmt.to_params(fmt.from_params(params, cfg), cfg, 16)
  np.testing.assert_array_equal(back["img"]["embedding"]["bias"], 0)
  ref = np.load(os.path.join(D, "open_clip_ref.npz"))
  a, _ = forward(cfg, params, ref)
  b, _ = forward(cfg, back, ref)
  np.testing.assert_allclose(np.asarray(a["image_emb"]), np.asarray(b["image_emb"]),
                             atol=1e-6)


def test_open_clip_to_hf_and_back_is_exact(tmp_path):
  cfg, params, _ = _load("open_clip")
  interop.save("hf_clip", params, cfg, str(tmp_path / "hf"), 16)
  assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
  cfg2, params2, size = interop.load("hf_clip", str(tmp_path / "hf"))
  assert size == 16 and cfg2.image.num_heads == 2 and cfg2.mlp_act == "gelu"
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(params2)[k], v, err_msg=k)
  hf = json.load(open(tmp_path / "hf" / "config.json"))
  assert hf["vision_config"]["hidden_act"] == "gelu"
  assert hf["text_config"]["num_attention_heads"] == 2


def test_open_clip_export_writes_its_model_config(tmp_path):
  cfg, params, _ = _load("openai")
  out = str(tmp_path / "m.safetensors")
  raw = interop.save("open_clip", params, cfg, out, 16)
  oc = json.load(open(tmp_path / "m.json"))
  assert oc["quick_gelu"] and oc["vision_cfg"]["head_width"] == 8
  assert oc["vision_cfg"]["image_size"] == 16 and oc["vision_cfg"]["patch_size"] == 4
  assert oc["vision_cfg"]["norm_kwargs"] == {"eps": 1e-5} and not oc["vision_cfg"]["no_ln_pre"]
  back = common.read_any(out)
  for k in raw:
    np.testing.assert_array_equal(back[k], raw[k])


def test_scan_and_fused_layouts(forward):
  """Import straight into scan_layers / fused_qkv layouts; export from them."""
  cfg, params, _ = _load("open_clip")
  ref = np.load(os.path.join(D, "open_clip_ref.npz"))
  cfg_s = cfg.copy_and_resolve_references()
  cfg_s.scan_layers, cfg_s.fused_qkv = True, True
  _, params_s, _ = _load("open_clip", model_cfg=cfg_s)
  shapes = param_shapes(two_tower.TwoTower(cfg_s, jnp.float32), 16, 16)
  assert {k: v.shape for k, v in flat(params_s).items()} == shapes
  assert "img/encoder/layers/block/attn/qkv_kernel" in shapes
  diffs = _max_diffs(*forward(cfg_s, params_s, ref), ref)
  assert max(diffs.values()) <= TOL, diffs
  fmt = interop.get("open_clip")
  a, b = fmt.from_params(params_s, cfg_s), fmt.from_params(params, cfg)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_position_resize_matches_open_clip():
  ref = np.load(os.path.join(D, "open_clip_ref.npz"))
  raw = common.read_any(os.path.join(D, "open_clip.safetensors"))
  pos = raw["visual.positional_embedding"]
  for size in (24, 8):  # Upsampling (6x6) and antialiased downsampling (2x2).
    want = ref[f"pos_embed_{size}"]
    got = common.resize_grid(pos[1:], size // 4)
    np.testing.assert_allclose(got, want[1:], atol=1e-6)
  cfg, params, size = _load("open_clip", image_size=24)
  assert size == 24 and params["img"]["pos_embedding"].shape == (1, 36, 16)
  np.testing.assert_allclose(params["img"]["pos_embedding"][0], ref["pos_embed_24"][1:],
                             atol=1e-6)
  assert cfg.image.patch_size == 4


def test_text_pools_argmax_and_last():
  x = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
  tokens = jnp.array([[5, 9, 0, 0], [7, 2, 8, 3]])
  np.testing.assert_array_equal(np.asarray(text.pool_tokens(x, tokens, "argmax"))[:, 0],
                                [1, 6])
  np.testing.assert_array_equal(np.asarray(text.pool_tokens(x, tokens, "last"))[:, 0],
                                [3, 7])


def test_model_option_validation():
  c = config_lib.default_config()
  c.model.mlp_act = "relu"
  with pytest.raises(errors.ConfigError, match="mlp_act"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.model.text.pool = "max"
  with pytest.raises(errors.ConfigError, match="text.pool"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.init_from.format = "open_clip"
  with pytest.raises(errors.ConfigError, match="init_from.checkpoint"):
    config_lib.validate(c)
  c.init_from.format = "tf_hub"
  with pytest.raises(errors.ConfigError, match="not one of"):
    config_lib.validate(c)


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(errors.DataPathError, match="nothing is downloaded"):
    interop.load("open_clip", str(tmp_path / "missing.safetensors"))
  with pytest.raises(errors.CheckpointError, match="does not support"):
    interop.load("open_clip", os.path.join(D, "hf_clip", "model.safetensors"))
  with pytest.raises(errors.ConfigKeyError, match="unknown weight format"):
    interop.get("tf_hub")
  cfg, params, _ = _load("open_clip")
  cfg.image.pool = "gap"
  with pytest.raises(errors.ConfigError, match="pool"):
    interop.get("open_clip").from_params(params, cfg)


def test_torch_only_files_name_the_extra(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  legacy = tmp_path / "legacy.pt"  # Not a zip archive: only torch.load reads it.
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(errors.DataError, match=r"vlp_jax\[torch\]"):
    common.read_any(str(legacy))
  jit = tmp_path / "ViT-B-32.pt"  # A TorchScript archive (as OpenAI's .pt files).
  with zipfile.ZipFile(jit, "w") as z:
    z.writestr("ViT-B-32/data.pkl", pickle.dumps({}))
    z.writestr("ViT-B-32/constants.pkl", pickle.dumps(()))
  with pytest.raises(errors.DataError, match=r"vlp_jax\[torch\]"):
    common.read_any(str(jit))
