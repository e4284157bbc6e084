"""`config.init_from.format`: another library's weights as the start of a run or for
evaluation (vlp_jax/train/init_from.py `load_params`, with vlp_jax/interop/)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
import flax.linen as nn

from vlp_jax import config as config_lib
from vlp_jax import errors, interop
from vlp_jax.models import two_tower
from vlp_jax.train import init_from

D = os.path.join(os.path.dirname(__file__), "fixtures", "interop", "clip")
WEIGHTS = os.path.join(D, "openai.safetensors")


def _imported():
  return interop.load("openai", WEIGHTS, image_heads=2, text_heads=2)


def _config(model_cfg, **init):
  c = config_lib.default_config()
  c.model = model_cfg
  c.data.image_size = 16
  c.init_from.update(dict(dict(format="openai", checkpoint=WEIGHTS), **init))
  config_lib.validate(c)
  return c


def _template(model_cfg, image_size=16, seed=1):
  model = two_tower.TwoTower(model_cfg, jnp.float32)
  batch = {"image": jnp.zeros((1, image_size, image_size, 3)),
           "text": jnp.zeros((1, model_cfg.text.context_length), jnp.int32)}
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), batch)["params"]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # Fresh "initialisation": a constant per leaf, so untouched leaves are recognisable.
  return jax.tree.map(lambda s: jnp.full(s.value.shape, 0.5, s.value.dtype, device=sharding),
                      shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def test_load_params_equals_the_direct_import():
  cfg, want, _ = _imported()
  params, report = init_from.load_params(_config(cfg), _template(cfg))
  assert not report.missing and not report.unexpected and report.loaded
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(np.asarray(_flat(params)[k]), v, err_msg=k)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_lit_selection_rules_apply_to_the_converted_tree():
  cfg, want, _ = _imported()
  config = _config(cfg, include=["img/.*", "img_proj/.*"])
  params, report = init_from.load_params(config, _template(cfg))
  flat = _flat(params)
  np.testing.assert_array_equal(np.asarray(flat["img/cls"]), _flat(want)["img/cls"])
  np.testing.assert_array_equal(np.asarray(flat["txt/token_embedding/embedding"]), 0.5)
  assert any(n.startswith("txt/") for n in report.not_selected)


def test_scan_layout_and_another_resolution():
  cfg, _, _ = _imported()
  cfg = cfg.copy_and_resolve_references()
  cfg.scan_layers = True
  config = _config(cfg)
  config.data.image_size = 24
  params, _ = init_from.load_params(config, _template(cfg, image_size=24))
  flat = _flat(params)
  assert flat["img/pos_embedding"].shape == (1, 36, 16)
  assert flat["img/encoder/layers/block/mlp/fc1/kernel"].shape == (2, 16, 32)
  assert float(jnp.abs(flat["img/pos_embedding"] - 0.5).max()) > 0.01


def test_architecture_mismatch_lists_the_overrides():
  cfg, _, _ = _imported()
  mine = cfg.copy_and_resolve_references()
  mine.mlp_act, mine.layer_norm_eps = "gelu_tanh", 1e-6
  with pytest.raises(errors.ConfigError,
                     match=r"config.model.mlp_act='quick_gelu', config.model.layer_norm_eps"):
    init_from.load_params(_config(mine), _template(mine))
  mine = cfg.copy_and_resolve_references()
  mine.image.ln_pre = False  # The checkpoint's ln_pre has no place in this model.
  with pytest.raises(ValueError, match=r"img/ln_pre/bias.*add them to init_from.exclude"):
    init_from.load_params(_config(mine), _template(mine))


def test_open_clip_activation_comes_from_the_run():
  """open_clip files do not say GELU or QuickGELU: a '-quickgelu' model (here the
  QuickGELU weights of the openai fixture read as format open_clip) loads into a run
  with mlp_act=quick_gelu, as `--print_config --quick_gelu=true` prints it. Format
  'openai' (always QuickGELU) still checks the run's activation."""
  quick, want, _ = interop.load("open_clip", WEIGHTS, quick_gelu=True, image_heads=2,
                                text_heads=2)
  assert quick.mlp_act == "quick_gelu"
  params, report = init_from.load_params(_config(quick, format="open_clip"),
                                         _template(quick))
  assert not report.missing and not report.unexpected
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(np.asarray(_flat(params)[k]), v, err_msg=k)
  tanh = quick.copy_and_resolve_references()
  tanh.mlp_act = "gelu_tanh"  # open_clip's act_kwargs approximate='tanh'.
  init_from.load_params(_config(tanh, format="open_clip"), _template(tanh))
  with pytest.raises(errors.ConfigError, match="config.model.mlp_act='quick_gelu'"):
    init_from.load_params(_config(tanh, format="openai"), _template(tanh))


def test_missing_weights_file():
  cfg, _, _ = _imported()
  config = _config(cfg)
  config.init_from.checkpoint = "/nonexistent/open_clip_model.safetensors"
  with pytest.raises(errors.DataPathError, match="nonexistent"):
    init_from.load_params(config, _template(cfg))


def test_convert_weights_cli_round_trip(tmp_path):
  """tools/convert_weights.py: openai -> a vlp_jax checkpoint (loaded by init_from with
  format '') -> hf_clip -> the same params."""
  from tools import convert_weights  # pylint: disable=import-outside-toplevel
  cfg, want, _ = _imported()
  out = str(tmp_path / "vj")
  convert_weights.convert("openai", WEIGHTS, "vlp_jax", out,
                          options=dict(image_heads=2, text_heads=2))
  config = _config(cfg)
  config.init_from.update(format="", checkpoint=os.path.join(out, "checkpoints", "0"))
  params, report = init_from.load_params(config, _template(cfg))
  assert not report.missing and not report.unexpected
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(np.asarray(_flat(params)[k]), v, err_msg=k)
  # The default config's tokenizer ('bytes': EOS 2, not its highest id) cannot be
  # HF CLIP's; one that cannot be built here falls back to CLIP's ids (a warning).
  with pytest.raises(errors.ConfigError, match="not its highest id"):
    convert_weights.convert("vlp_jax", out, "hf_clip", str(tmp_path / "hf"))
  with open(os.path.join(out, "config.json")) as f:
    run_cfg = json.load(f)
  run_cfg["data"]["tokenizer"] = "words:/nonexistent/vocab.txt"
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(run_cfg, f)
  with pytest.warns(UserWarning, match="cannot build the tokenizer"):
    convert_weights.convert("vlp_jax", out, "hf_clip", str(tmp_path / "hf"))
  cfg2, back, size = interop.load("hf_clip", str(tmp_path / "hf"))
  assert size == 16 and cfg2.mlp_act == "quick_gelu"
  for k, v in _flat(want).items():
    np.testing.assert_array_equal(_flat(back)[k], v, err_msg=k)
  lines = convert_weights.overrides(cfg, 16)
  assert "--config.model.mlp_act=quick_gelu" in lines
  assert "--config.model.image.ln_pre=True" in lines
