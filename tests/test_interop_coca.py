"""open_clip CoCa weight interop (vlp_jax/interop/open_clip_coca.py) and the 'open_clip'
CoCa layout (vlp_jax/models/coca.py): numerical parity with open_clip on a tiny random
CoCa (fixtures made by tools/make_coca_fixtures.py with torch / open_clip; not needed
here), .bin read without torch, exact export round trips, param layouts, generation,
FLOPs, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.interop_helpers import (assert_exported_array, flat, jitted_forward,
                                   param_shapes)
from vlp_jax import config as config_lib
from vlp_jax import errors, interop
from vlp_jax.interop import common
from vlp_jax.models import coca, generate
from vlp_jax.train import init_from

D = os.path.join(os.path.dirname(__file__), "fixtures", "interop", "coca")
WEIGHTS = os.path.join(D, "coca.safetensors")
# The fixture's heads are not 64 wide: ViT 3, text and decoder 2, pooler 4.
HEADS = dict(image_heads=3, text_heads=2, pool_heads=4)
TOL = 1e-5
SIZE = 16


def _load(path=WEIGHTS, **kw):
  return interop.load("open_clip_coca", path, **dict(HEADS, **kw))


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(D, "coca_ref.npz")))


@pytest.fixture(scope="module")
def forward():
  """One jitted forward per model config: (cfg, params, ref) -> outputs."""
  def make_fn(cfg):
    model = coca.CoCa(cfg, jnp.float32)

    def fn(p, images, tokens):
      out = model.apply({"params": p}, {"image": images, "text": tokens})
      _, _, context = model.apply({"params": p}, images, method="encode_image")
      out["logits"] = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
      out["context"] = context
      return out
    return fn
  return jitted_forward(make_fn)


def _max_diffs(out, ref):
  def d(a, b):
    a = np.asarray(a)
    assert a.shape == b.shape and np.isfinite(b).all()
    return float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf")
  return {"image_emb": d(out["image_emb"], ref["image_emb"]),
          "text_emb": d(out["text_emb"], ref["text_emb"]),
          "logits": d(out["logits"], ref["logits"]),
          # open_clip's teacher-forced logits are those of text[:, :-1].
          "caption_logits": d(out["caption_logits"][:, :-1], ref["caption_logits"]),
          "context": d(out["context"], ref["context"])}


@pytest.fixture(scope="module")
def imported():
  return _load()


def test_parity_with_open_clip(imported, ref, forward):
  cfg, params, size = imported
  assert size == SIZE
  out = forward(cfg, params, ref)
  assert set(out) - {"logits", "context"} == coca.CoCa.outputs(cfg)
  diffs = _max_diffs(out, ref)
  assert max(diffs.values()) <= TOL, diffs


def test_torch_bin_reads_without_torch_and_gives_the_same_params(imported):
  raw_st = common.read_any(WEIGHTS)
  raw_bin = common.read_any(os.path.join(D, "coca.bin"))
  assert sorted(raw_bin) == sorted(raw_st)
  for k, v in raw_st.items():
    np.testing.assert_array_equal(raw_bin[k], v, err_msg=k)
  _, params, _ = _load(os.path.join(D, "coca.bin"))
  for k, v in flat(imported[1]).items():
    np.testing.assert_array_equal(flat(params)[k], v, err_msg=k)


def test_parity_check_can_fail(imported, ref, forward):
  """Without open_clip's class-token key mask the text embeddings of padded captions
  and the caption logits change (the image side does not)."""
  cfg, params, _ = imported
  no_mask = cfg.copy_and_resolve_references()
  no_mask.text.padding_mask = False
  diffs = _max_diffs(forward(no_mask, params, ref), ref)
  assert diffs["text_emb"] > 10 * TOL and diffs["caption_logits"] > 10 * TOL, diffs
  assert diffs["image_emb"] <= TOL, diffs


def test_reference_model_has_nonzero_key_biases():
  """The parity above holds with non-zero key biases, which import drops (exact)."""
  raw = common.read_any(WEIGHTS)
  for name in ("visual.attn_pool.attn.in_proj_bias",
               "text.transformer.resblocks.0.attn.in_proj_bias",
               "text_decoder.resblocks.1.attn.in_proj_bias",
               "text_decoder.cross_attn.0.attn.in_proj_bias"):
    b = raw[name]
    w = b.shape[0] // 3
    assert np.abs(b[w:2 * w]).min() > 1e-4, name
  # Separate q/k/v weights (key width 24 != query width 12), as released models.
  assert raw["visual.attn_pool.attn.k_proj_weight"].shape == (12, 24)


def test_model_config_inferred_from_the_arrays(imported):
  cfg, _, _ = imported
  im, tx, dec = cfg.image, cfg.text, cfg.decoder
  assert (cfg.name, cfg.coca_layout, cfg.embed_dim) == ("coca", "open_clip", 12)
  assert (im.width, im.depth, im.mlp_dim, im.patch_size, im.num_heads, im.pool) == (
      24, 2, 24, 4, 3, "cls")
  assert (tx.width, tx.depth, tx.mlp_dim, tx.vocab_size, tx.context_length) == (
      12, 2, 48, 64, 16)
  assert (dec.depth, dec.num_queries, dec.pool_heads) == (2, 5, 4)
  assert im.ln_pre and tx.padding_mask and cfg.mlp_act == "gelu"
  assert cfg.layer_norm_eps == 1e-5
  c = config_lib.default_config()
  c.model = cfg
  config_lib.validate(c)
  with pytest.raises(errors.ConfigError, match="head_dim"):  # 24 wide: no 64-wide heads.
    interop.load("open_clip_coca", WEIGHTS)
  with pytest.raises(errors.ConfigError, match="pool_heads"):  # 12 wide: not 8 heads.
    interop.load("open_clip_coca", WEIGHTS, image_heads=3, text_heads=2)


def test_export_round_trip_is_exact(imported):
  fmt = interop.get("open_clip_coca")
  raw = fmt.read(WEIGHTS)
  cfg, params, _ = imported
  out = fmt.from_params(params, cfg)
  assert sorted(out) == sorted(raw)
  cls_key, pos_key = "visual.class_embedding", "visual.positional_embedding"
  for k in out:
    assert out[k].shape == raw[k].shape and out[k].dtype == np.float32, k
    if k not in (cls_key, pos_key):
      assert_exported_array(k, out[k], raw[k])
  np.testing.assert_array_equal(out[pos_key][1:], raw[pos_key][1:])
  np.testing.assert_array_equal(out[cls_key], raw[cls_key] + raw[pos_key][0])
  again = fmt.to_params(out, cfg, SIZE)  # Export then import is exact.
  assert flat(again).keys() == flat(params).keys()
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(again)[k], v, err_msg=k)


def test_save_writes_safetensors_and_the_open_clip_model_config(imported, tmp_path):
  cfg, params, _ = imported
  path = str(tmp_path / "coca.safetensors")
  raw = interop.save("open_clip_coca", params, cfg, path, SIZE)
  back = common.read_any(path)
  assert sorted(back) == sorted(raw)
  for k in raw:
    np.testing.assert_array_equal(back[k], raw[k], err_msg=k)
  oc = json.load(open(tmp_path / "coca.json"))
  want = json.load(open(os.path.join(D, "coca_config.json")))
  for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
    for key, value in want[tower].items():
      assert oc[tower][key] == value, (tower, key, oc[tower][key], value)
  assert oc["embed_dim"] == want["embed_dim"] and not oc["quick_gelu"]


def test_scan_and_fused_layouts(imported, ref, forward):
  """Import straight into scan_layers / fused_qkv layouts (decoder included); export
  from them."""
  cfg, params, _ = imported
  cfg_s = cfg.copy_and_resolve_references()
  cfg_s.scan_layers, cfg_s.fused_qkv = True, True
  _, params_s, _ = _load(model_cfg=cfg_s)
  shapes = param_shapes(coca.CoCa(cfg_s, jnp.float32), SIZE, 16)
  assert {k: v.shape for k, v in flat(params_s).items()} == shapes
  assert "decoder/layers/block/attn/qkv_kernel" in shapes
  assert "decoder/layers/block/cross_attn/query/kernel" in shapes
  diffs = _max_diffs(forward(cfg_s, params_s, ref), ref)
  assert max(diffs.values()) <= TOL, diffs
  fmt = interop.get("open_clip_coca")
  a, b = fmt.from_params(params_s, cfg_s), fmt.from_params(params, cfg)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fresh_model_matches_the_imported_tree(imported):
  """A freshly initialised 'open_clip' CoCa has exactly the imported params' names and
  shapes (no parameter is left unset or extra)."""
  cfg, params, _ = imported
  shapes = param_shapes(coca.CoCa(cfg, jnp.float32), SIZE, 16)
  assert {k: v.shape for k, v in flat(params).items()} == shapes


def _template(cfg):
  model = coca.CoCa(cfg, jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          {"image": jnp.zeros((1, SIZE, SIZE, 3)),
                           "text": jnp.zeros((1, cfg.text.context_length), jnp.int32)})
  return jax.tree.map(lambda s: jnp.full(s.value.shape, 0.5, s.value.dtype),
                      shapes["params"], is_leaf=lambda x: hasattr(x, "value"))


def test_init_from_format_open_clip_coca(imported):
  """`config.init_from.format='open_clip_coca'` loads the same params (also into a
  shorter text context), and names the architecture overrides a model lacks."""
  cfg, want, _ = imported
  c = config_lib.default_config()
  c.model, c.data.image_size = cfg, SIZE
  c.init_from.update(format="open_clip_coca", checkpoint=WEIGHTS)
  config_lib.validate(c)
  params, report = init_from.load_params(c, _template(cfg))
  assert not report.missing and not report.unexpected
  for k, v in flat(want).items():
    np.testing.assert_array_equal(np.asarray(flat(params)[k]), v, err_msg=k)
  c.model = cfg.copy_and_resolve_references()
  c.model.text.context_length = 8
  params, _ = init_from.load_params(c, _template(c.model))
  np.testing.assert_array_equal(np.asarray(params["txt"]["pos_embedding"]),
                                want["txt"]["pos_embedding"][:, :9])
  c.model = cfg.copy_and_resolve_references()
  c.model.decoder.pool_heads = 0  # Heads are not in the arrays: 8 would not divide 12.
  with pytest.raises(errors.ConfigError, match="decoder.pool_heads"):
    init_from.load_params(c, _template(c.model))


def test_greedy_generation_with_imported_weights(imported, ref):
  """The first generated token is open_clip's argmax after BOS (position 0 sees only
  BOS); generation runs on the imported model."""
  cfg, params, _ = imported
  model = coca.CoCa(cfg, jnp.float32)
  images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))
  bos, eos = int(ref["tokens"][0, 0]), 63
  out = np.asarray(generate.greedy_generate(model, params, images, 6, bos, eos))
  assert out.shape == (3, 6) and (out[:, 0] == bos).all()
  np.testing.assert_array_equal(out[:, 1], ref["caption_logits"][:, 0].argmax(-1))


def test_errors_name_the_problem(imported, tmp_path):
  clip = os.path.join(os.path.dirname(D), "clip", "open_clip.safetensors")
  with pytest.raises(errors.CheckpointError, match="format 'open_clip'"):
    interop.load("open_clip_coca", clip, **HEADS)
  with pytest.raises(errors.CheckpointError, match="format 'open_clip_coca'"):
    interop.load("open_clip", WEIGHTS, image_heads=3, text_heads=2)
  with pytest.raises(errors.DataPathError, match="nothing is downloaded"):
    interop.load("open_clip_coca", str(tmp_path / "missing.safetensors"))
  fmt = interop.get("open_clip_coca")
  raw = dict(fmt.read(WEIGHTS))
  raw["text.transformer.resblocks.0.ls_1.gamma"] = np.ones(12, np.float32)  # layer scale
  with pytest.raises(errors.CheckpointError, match="does not support.*ls_1"):
    fmt.model_config(raw, None, **HEADS)
  cfg, params, _ = imported
  bad = cfg.copy_and_resolve_references()
  bad.coca_layout = "vlp_jax"
  with pytest.raises(errors.ConfigError, match="coca_layout='open_clip'"):
    interop.get("open_clip_coca").from_params(params, bad)
  bad = cfg.copy_and_resolve_references()
  bad.layer_norm_eps = 1e-6
  with pytest.raises(errors.ConfigError, match="layer_norm_eps"):
    interop.get("open_clip_coca").from_params(params, bad)


def test_layout_option_validation():
  c = config_lib.default_config()
  c.model.coca_layout = "timm"
  with pytest.raises(errors.ConfigError, match="coca_layout"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.model.name, c.model.coca_layout = "coca", "open_clip"
  c.model.embed_dim = c.model.text.width + 1
  with pytest.raises(errors.ConfigError, match="embed_dim == config.model.text.width"):
    config_lib.validate(c)
  c.model.embed_dim = c.model.text.width
  config_lib.validate(c)
  c.model.decoder.pool_heads = 7
  with pytest.raises(errors.ConfigError, match="pool_heads=7 does not divide"):
    config_lib.validate(c)
  c.model.decoder.pool_heads = -1
  with pytest.raises(errors.ConfigError, match="pool_heads"):
    config_lib.validate(c)


def test_open_clip_text_mask_is_shifted_by_one():
  """open_clip's released CoCa key mask: key j > 0 is masked iff token j - 1 is pad."""
  tokens = jnp.array([[5, 0, 7, 0, 0]])
  got = np.asarray(coca.open_clip_text_mask(tokens))[0, 0, 0]
  np.testing.assert_array_equal(got, [True, True, False, True, False, False])


@pytest.mark.skipif(not os.environ.get("VLP_COCA_CHECKPOINT"),
                    reason="set VLP_COCA_CHECKPOINT and VLP_COCA_REFERENCE")
def test_real_checkpoint_parity(forward):
  """A downloaded open_clip CoCa (e.g. coca_ViT-B-32's .safetensors / .bin) against
  reference outputs made by `tools/make_coca_fixtures.py --real=PATH --out=REF.npz`."""
  real_ref = dict(np.load(os.environ["VLP_COCA_REFERENCE"]))
  cfg, params, _ = interop.load("open_clip_coca", os.environ["VLP_COCA_CHECKPOINT"],
                                image_size=int(real_ref["images"].shape[-1]))
  diffs = _max_diffs(forward(cfg, params, real_ref), real_ref)
  print("max abs diffs", diffs)
  # Deep float32 towers through two libraries' kernels: 1e-4 on the unit-norm
  # embeddings; logits are scaled by exp(t) (about 100), caption logits by their size.
  scale = float(np.exp(params["scale"]["logit_scale"]))
  assert max(diffs["image_emb"], diffs["text_emb"]) <= 1e-4, diffs
  assert diffs["logits"] <= 1e-4 * scale, diffs
  assert diffs["caption_logits"] <= 1e-4 * max(1.0, np.abs(
      real_ref["caption_logits"]).max()), diffs


@pytest.mark.slow  # Compiles a CoCa train step (~20 s).
def test_open_clip_layout_flops_match_xla():
  from tests import test_flops, test_train  # pylint: disable=import-outside-toplevel
  c = test_train.tiny_config()
  c.model.name, c.model.coca_layout = "coca", "open_clip"
  c.objectives = {"clip": 1.0, "caption": 2.0}
  c.model.image.update(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8)
  c.model.text.update(width=128, depth=2, mlp_dim=512, num_heads=2)
  c.model.embed_dim = 128
  c.model.decoder.update(pool_heads=4)
  test_flops.assert_analytic_matches_xla(c)
