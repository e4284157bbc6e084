"""SigLIP weights in and out: Hugging Face `SiglipModel` safetensors and big_vision
`.npz` (vlp_jax/interop/{hf_siglip,big_vision,siglip_tree}.py).

The fixtures (tests/fixtures/interop/siglip/, made by tools/make_siglip_fixtures.py)
hold a tiny random HF SiglipModel with non-zero biases everywhere (attention key
biases included, which the import drops), its outputs on fixed inputs, and the same
weights in big_vision's layout (image blocks scanned, text blocks unrolled).

Parity on a real checkpoint: set VLP_SIGLIP_CHECKPOINT (an HF folder or a big_vision
.npz), VLP_SIGLIP_REFERENCE (a reference.npz made from the HF model by
`tools/make_siglip_fixtures.py --from_pretrained=DIR --out=DIR2`) and, for an .npz,
VLP_SIGLIP_FORMAT=big_vision; see test_real_checkpoint_parity.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from tests.interop_helpers import assert_exported_array, param_shapes
from vlp_jax import config as config_lib
from vlp_jax import errors, interop, models
from vlp_jax.interop import big_vision, common, hf_siglip, siglip_tree
from vlp_jax.models import heads
from vlp_jax.train import init_from

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "interop", "siglip")
TOL = 1e-5


def base_cfg():
  return config_lib.default_config().model


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIXTURES, "reference.npz")))


@pytest.fixture(scope="module")
def hf_raw():
  return hf_siglip.read(FIXTURES)


@pytest.fixture(scope="module")
def bv_raw():
  return big_vision.read(os.path.join(FIXTURES, "big_vision.npz"))


@pytest.fixture(scope="module")
def hf_cfg(hf_raw):
  return hf_siglip.model_config(hf_raw, base_cfg())


_APPLY = {}


def run(m, params, ref):
  """Our outputs and logits (exp(t) <img, txt> + b) on the fixture's inputs; one
  jitted function per model config."""
  key = json.dumps(m.to_dict(), sort_keys=True)
  if key not in _APPLY:
    model = models.build_model(m)
    _APPLY[key] = jax.jit(lambda p, b: model.apply({"params": p}, b))
  batch = {"image": jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1)),
           "text": jnp.asarray(ref["input_ids"])}
  out = {k: np.asarray(v) for k, v in _APPLY[key](params, batch).items()}
  out["logits"] = (out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
                   + out.get("logit_bias", 0.0))
  return out


def assert_parity(out, ref, tol=TOL, logits_tol=TOL):
  """Max abs differences of the embeddings <= tol and of the logits <= logits_tol."""
  for ours, theirs, limit in (("image_emb", "image_embeds", tol),
                              ("text_emb", "text_embeds", tol),
                              ("logits", "logits_per_image", logits_tol)):
    assert out[ours].shape == ref[theirs].shape, ours
    diff = np.abs(out[ours] - ref[theirs]).max()
    assert diff <= limit, (ours, diff)


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------------ import

def test_formats_registered():
  assert interop.FORMATS["hf_siglip"] is hf_siglip
  assert interop.FORMATS["big_vision"] is big_vision


def test_model_config_from_arrays(hf_cfg):
  m = hf_cfg
  assert (m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads,
          m.image.patch_size) == (32, 2, 64, 4, 8)
  assert (m.text.vocab_size, m.text.width, m.text.depth, m.text.mlp_dim,
          m.text.num_heads, m.text.context_length) == (64, 24, 2, 48, 4, 16)
  assert m.embed_dim == 32 and m.proj_bias and m.use_logit_bias
  assert not m.image.proj and m.text.proj and m.image.pool == "map"
  assert (m.text.pool, m.text.causal, m.text.padding_mask) == ("last", False, False)
  assert m.mlp_act == "gelu_tanh" and m.layer_norm_eps == 1e-6
  models.check_config(m)


def test_hf_import_matches_reference(hf_raw, hf_cfg, ref):
  # The fixture's attention key biases are non-zero: dropping them is exact.
  key_biases = [v for k, v in hf_raw.items() if k.endswith("k_proj.bias")]
  key_biases.append(np.split(hf_raw["vision_model.head.attention.in_proj_bias"], 3)[1])
  assert len(key_biases) == 5 and all(np.abs(b).min() > 0 for b in key_biases)
  params = hf_siglip.to_params(hf_raw, hf_cfg, 32)
  out = run(hf_cfg, params, ref)
  assert_parity(out, ref)
  np.testing.assert_allclose(out["logit_scale"], ref["logit_scale"][0], rtol=1e-6)
  np.testing.assert_allclose(out["logit_bias"], ref["logit_bias"][0], rtol=1e-6)


def test_big_vision_import_matches_reference(bv_raw, hf_cfg, ref):
  assert any("/encoderblock/" in k for k in bv_raw)  # the image blocks are scanned
  assert all(np.abs(bv_raw[k]).min() > 0 for k in bv_raw if k.endswith("key/bias"))
  m = big_vision.model_config(bv_raw, base_cfg())
  assert m.to_dict() == hf_cfg.to_dict()
  assert_parity(run(m, big_vision.to_params(bv_raw, m, 32), ref), ref)


def test_import_into_scanned_fused_layout(hf_raw, hf_cfg, ref):
  m = copy.deepcopy(hf_cfg)
  m.scan_layers, m.fused_qkv = True, True
  params = hf_siglip.to_params(hf_raw, m, 32)
  expected = param_shapes(models.build_model(m), 32, 16)
  assert {k: v.shape for k, v in flat(params).items()} == expected
  assert_parity(run(m, params, ref), ref)
  # Export from that layout equals export from the canonical one.
  canon = hf_siglip.from_params(hf_siglip.to_params(hf_raw, hf_cfg, 32), hf_cfg)
  for k, v in hf_siglip.from_params(params, m).items():
    np.testing.assert_array_equal(v, canon[k], err_msg=k)


def test_resize_positions(hf_raw, hf_cfg):
  params = hf_siglip.to_params(hf_raw, hf_cfg, 48)
  assert params["img"]["pos_embedding"].shape == (1, 36, 32)
  same = hf_siglip.to_params(hf_raw, hf_cfg, 32)
  np.testing.assert_array_equal(
      same["img"]["pos_embedding"][0],
      hf_raw["vision_model.embeddings.position_embedding.weight"])
  model = models.build_model(hf_cfg)
  emb, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_image"))(
      params, jnp.zeros((1, 48, 48, 3)))
  assert emb.shape == (1, 32) and np.isfinite(np.asarray(emb)).all()
  with pytest.raises(errors.ConfigError, match="not divisible"):
    hf_siglip.to_params(hf_raw, hf_cfg, 36)


def test_load_and_save_through_the_interop_api(hf_cfg, tmp_path):
  m, params, size = interop.load("hf_siglip", FIXTURES)
  assert size == 32 and m.to_dict() == hf_cfg.to_dict()
  interop.save("big_vision", params, m, str(tmp_path / "bv.npz"), size)
  m2, params2, size2 = interop.load("big_vision", str(tmp_path / "bv.npz"))
  assert size2 == 32 and m2.to_dict() == m.to_dict()
  assert_trees_equal(params2, params)
  interop.save("hf_siglip", params2, m2, str(tmp_path / "hf"), size2)
  m3, params3, _ = interop.load("hf_siglip", str(tmp_path / "hf"))
  assert m3.to_dict() == m.to_dict()
  assert_trees_equal(params3, params)


def test_init_from_hf_siglip(hf_cfg):
  """config.init_from.format='hf_siglip' fills the whole model; a model that would
  compute something else (a lower logit-scale clamp, no projection bias) is refused
  with the overrides to set."""
  config = config_lib.default_config()
  config.model, config.data.image_size = copy.deepcopy(hf_cfg), 32
  config.init_from.format = "hf_siglip"
  config.init_from.checkpoint = os.path.join(FIXTURES, "model.safetensors")
  config_lib.validate(config)
  model = models.build_model(config.model)
  shapes = jax.eval_shape(lambda: meta.unbox(model.init(
      jax.random.PRNGKey(0), {"image": jnp.zeros((1, 32, 32, 3)),
                              "text": jnp.zeros((1, 16), jnp.int32)}))["params"])
  params, report = init_from.load_params(config, shapes)
  assert len(report.loaded) == len(flat(shapes)) and not report.missing
  config.model.logit_scale_max = 5.0
  with pytest.raises(errors.ConfigError, match="logit_scale_max=11.0"):
    init_from.load_params(config, shapes)
  assert np.isfinite(np.asarray(params["scale"]["logit_scale"]))


def test_shorter_text_context(hf_raw, hf_cfg):
  m = copy.deepcopy(hf_cfg)
  m.text.context_length = 8
  assert hf_siglip.to_params(hf_raw, m, 32)["txt"]["pos_embedding"].shape == (1, 8, 24)
  m.text.context_length = 17
  with pytest.raises(errors.ConfigError, match="context_length=17"):
    hf_siglip.to_params(hf_raw, m, 32)


# ------------------------------------------------------------------------ export

def test_hf_export_equals_original(hf_raw, hf_cfg):
  arrays = hf_siglip.from_params(hf_siglip.to_params(hf_raw, hf_cfg, 32), hf_cfg)
  assert sorted(arrays) == sorted(hf_raw)
  for k, v in hf_raw.items():
    assert arrays[k].dtype == np.float32 and arrays[k].shape == v.shape, k
    assert_exported_array(k, arrays[k], v)
  exported = hf_siglip.export_config(hf_cfg, 32)
  for tower, fields in hf_raw.meta.items():
    if tower.endswith("_config") and isinstance(fields, dict):
      for key, value in exported[tower].items():
        assert fields[key] == value, (tower, key)


def test_hf_export_then_import_is_exact(hf_raw, hf_cfg, ref, tmp_path):
  params = hf_siglip.to_params(hf_raw, hf_cfg, 32)
  hf_siglip.write(hf_siglip.from_params(params, hf_cfg), str(tmp_path / "out"),
                  hf_siglip.export_config(hf_cfg, 32))
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["model_type"] == "siglip"
  back = hf_siglip.read(str(tmp_path / "out" / "model.safetensors"))
  m = hf_siglip.model_config(back, base_cfg())
  assert m.to_dict() == hf_cfg.to_dict()
  assert_trees_equal(hf_siglip.to_params(back, m, 32), params)
  assert_parity(run(m, hf_siglip.to_params(back, m, 32), ref), ref)


def test_big_vision_export_equals_original(bv_raw, hf_cfg, tmp_path):
  params = big_vision.to_params(bv_raw, hf_cfg, 32)
  exported = big_vision.from_params(params, hf_cfg)
  original = big_vision.canonical(bv_raw)  # unrolled, as export writes it
  assert sorted(exported) == sorted(original)
  for k, v in original.items():
    if k.endswith("key/bias"):
      np.testing.assert_array_equal(exported[k], np.zeros_like(v))
    else:
      np.testing.assert_array_equal(exported[k], v, err_msg=k)
  path = str(tmp_path / "siglip.npz")
  big_vision.write(exported, path)
  back = big_vision.read(path)
  assert_trees_equal(big_vision.to_params(back, hf_cfg, 32), params)


def test_big_vision_prefix_bfloat16_and_image_head(hf_raw, hf_cfg, tmp_path):
  """An image `head` (ViT num_classes) and no text head; `params/` prefix; bf16."""
  m = copy.deepcopy(hf_cfg)
  m.image.proj, m.text.proj, m.embed_dim = True, False, 24
  params = siglip_tree.canonical(hf_siglip.to_params(hf_raw, hf_cfg, 32))
  del params["txt_proj"]
  rng = np.random.default_rng(0)
  params["img_proj"] = {"proj": {"kernel": rng.normal(size=(32, 24)).astype(np.float32),
                                 "bias": rng.normal(size=(24,)).astype(np.float32)}}
  raw = {"params/" + k: v for k, v in big_vision.from_params(params, m).items()}
  assert "params/img/head/kernel" in raw and "params/txt/head/kernel" not in raw
  got = big_vision.model_config(raw, base_cfg())
  assert got.image.proj and not got.text.proj and got.embed_dim == 24
  assert_trees_equal(big_vision.to_params(raw, got, 32), params)
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "bf16.npz")
  np.savez(path, **{k: np.asarray(v, ml_dtypes.bfloat16) for k, v in raw.items()})
  half = big_vision.to_params(big_vision.read(path), got, 32)
  fh, fp = flat(half), flat(params)
  diff = max(np.abs(fh[k] - fp[k]).max() for k in fp)
  assert 0 < diff < 0.05
  with pytest.raises(errors.ConfigError, match="no image projection"):
    hf_siglip.from_params(params, m)


# ------------------------------------------------------------------ bad input

def test_missing_file_is_a_data_path_error(tmp_path):
  with pytest.raises(errors.DataPathError, match="no file"):
    hf_siglip.read(str(tmp_path / "nope.safetensors"))
  with pytest.raises(errors.DataPathError, match="no file"):
    big_vision.read(str(tmp_path / "nope.npz"))


def test_wrong_checkpoint_is_a_checkpoint_error(hf_raw, bv_raw, hf_cfg):
  without = lambda name: common.Arrays({k: v for k, v in hf_raw.items() if k != name},
                                      meta=hf_raw.meta)
  with pytest.raises(errors.CheckpointError, match="logit_bias"):
    hf_siglip.model_config(without("logit_bias"), base_cfg())
  with pytest.raises(errors.CheckpointError, match="lacks 1 array"):
    hf_siglip.to_params(without("vision_model.head.probe"), hf_cfg, 32)
  with pytest.raises(errors.CheckpointError, match="does not"):
    hf_siglip.to_params(dict(hf_raw, **{"extra.weight": np.zeros(2)}), hf_cfg, 32)
  with pytest.raises(errors.CheckpointError, match="MAP head"):
    big_vision.model_config({k: v for k, v in bv_raw.items()
                             if not k.startswith("img/MAPHead_0")}, base_cfg())
  # Without config.json, a width that is no published SigLIP's gives a clear error;
  # the head counts can then be given.
  bare = common.Arrays(hf_raw)
  with pytest.raises(errors.CheckpointError, match="config.json.*image_heads"):
    hf_siglip.model_config(bare, base_cfg())
  m = hf_siglip.model_config(bare, base_cfg(), image_heads=4, text_heads=4)
  assert m.to_dict() == hf_cfg.to_dict()


def test_export_refuses_non_siglip_models(hf_raw, hf_cfg):
  params = hf_siglip.to_params(hf_raw, hf_cfg, 32)
  for key, value in (("text.pool", "eos"), ("text.causal", True),
                     ("text.padding_mask", True)):
    m = copy.deepcopy(hf_cfg)
    sub, field = key.split(".")
    m[sub][field] = value
    with pytest.raises(errors.ConfigError, match=f"config.model.{key}"):
      hf_siglip.from_params(params, m)
    with pytest.raises(errors.ConfigError, match=f"config.model.{key}"):
      big_vision.from_params(params, m)


# ---------------------------------------------------------- projection options

def test_projection_without_kernel_checks_width():
  x = jnp.ones((2, 8))
  out, _ = heads.Projection(8, linear=False).init_with_output(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="embed_dim"):
    heads.Projection(4, linear=False).init(jax.random.PRNGKey(0), x)
  variables = heads.Projection(4, use_bias=True).init(jax.random.PRNGKey(0), x)
  assert meta.unbox(variables)["params"]["proj"]["bias"].shape == (4,)


def test_projection_options_need_a_family_that_has_them():
  m = base_cfg()
  m.name, m.proj_bias = "coca", True
  with pytest.raises(errors.ConfigError, match="proj_bias"):
    models.check_config(m)
  m.name = "two_tower"
  models.check_config(m)


# ------------------------------------------------------ real checkpoint (opt-in)

@pytest.mark.skipif(not os.environ.get("VLP_SIGLIP_CHECKPOINT"),
                    reason="set VLP_SIGLIP_CHECKPOINT and VLP_SIGLIP_REFERENCE")
def test_real_checkpoint_parity():
  fmt = interop.FORMATS[os.environ.get("VLP_SIGLIP_FORMAT", "hf_siglip")]
  real_ref = dict(np.load(os.environ["VLP_SIGLIP_REFERENCE"]))
  raw = fmt.read(os.environ["VLP_SIGLIP_CHECKPOINT"])
  m = fmt.model_config(raw, base_cfg())
  params = fmt.to_params(raw, m, int(real_ref["pixel_values"].shape[-1]))
  out = run(m, params, real_ref)
  for ours, theirs in (("image_emb", "image_embeds"), ("text_emb", "text_embeds"),
                       ("logits", "logits_per_image")):
    print(ours, "max abs diff", np.abs(out[ours] - real_ref[theirs]).max())
  # Deep float32 towers through two libraries' kernels: 1e-4 on the unit-norm
  # embeddings; the logits are scaled by exp(t) (about 100 for the released models).
  assert_parity(out, real_ref, tol=1e-4,
                logits_tol=1e-4 * float(np.exp(m.logit_scale_init)))


def test_imported_config_validates(hf_cfg):
  config = config_lib.default_config()
  config.model = hf_cfg
  config.data.image_size = 32
  config_lib.validate(config)
