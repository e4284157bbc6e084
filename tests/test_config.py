"""Tests for the config schema, its validation, the recipes and the CLI's key checks."""
import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from vlp_jax import cli, errors
from configs import common
from vlp_jax import config as config_lib
from vlp_jax import validation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("demo", "clip_b16", "siglip_b16", "coca_b16", "filip_b16", "unicl_b16", "bench")


def _recipe(name):
  return cli.load_config_file(os.path.join(REPO_ROOT, "configs", f"{name}.py"))


def _from_dict(d):
  """A fresh (type-unconstrained) ConfigDict, as a hand-written config could be."""
  return ml_collections.ConfigDict(d)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_round_trips_through_json(name):
  c = _recipe(name)
  validation.validate(c)
  text = json.dumps(config_lib.to_dict(c), sort_keys=True)
  loaded = json.loads(text)
  assert loaded == config_lib.to_dict(c)
  # The saved config.json is itself a valid config.
  validation.validate(_from_dict(loaded))
  assert loaded["batch_size"] == c.batch_size
  assert loaded["model"]["name"] == c.model.name


def test_recipe_specific_values():
  demo = _recipe("demo")
  assert demo.model.name == "coca"
  assert dict(demo.objectives) == {"clip": 1.0, "caption": 2.0}
  assert demo.data.source == "shapes"
  assert set(demo.evals.keys()) == {"zeroshot", "retrieval", "captioning"}
  siglip = _recipe("siglip_b16")
  assert dict(siglip.objectives) == {"siglip": 1.0}
  assert siglip.model.use_logit_bias and siglip.model.logit_bias_init == -10.0
  coca = _recipe("coca_b16")
  assert coca.model.name == "coca" and "caption" in coca.objectives
  assert _recipe("clip_b16").model.image.variant == "B/16"


def test_default_config_validates():
  validation.validate(config_lib.default_config())


# ------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize("path,value,suggestion", [
    ("batchsize", 8, "'batch_size'"),
    ("model.image.widht", 64, "'width'"),
    ("model.text.contxt_length", 16, "'context_length'"),
    ("optim.weight_decy", 0.1, "'weight_decay'"),
    # No close spelling: the message lists the valid keys of the group instead.
    ("optim.learning_rate", 1e-3, "'lr'"),
])
def test_unknown_key_names_path_and_suggestion(path, value, suggestion):
  c = config_lib.default_config()
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(KeyError) as e:
    validation.validate(c)
  msg = str(e.value)
  assert f"'config.{path}'" in msg
  assert suggestion in msg


def test_check_keys_accepts_the_schema_itself_and_open_groups():
  c = config_lib.default_config()
  c.objectives = {"clip": 1.0, "siglip": 0.5}
  c.objective_cfg = {"siglip": {"anything": 1}}
  c.model.use_logit_bias = True  # siglip reads logit_bias
  config_lib.check_keys(c, config_lib.default_config())
  validation.validate(c)


# -------------------------------------------------------------------- types and values


def test_wrong_type_raises_type_error():
  d = config_lib.default_config().to_dict()
  d["batch_size"] = "8"
  with pytest.raises(TypeError, match=r"config\.batch_size.*int"):
    validation.validate(_from_dict(d))


def test_wrong_type_nested_and_bool():
  d = config_lib.default_config().to_dict()
  d["optim"]["lr"] = "1e-3"
  with pytest.raises(TypeError, match=r"config\.optim\.lr"):
    validation.validate(_from_dict(d))
  d = config_lib.default_config().to_dict()
  d["plot"] = 1  # int where a bool is expected
  with pytest.raises(TypeError, match=r"config\.plot"):
    validation.validate(_from_dict(d))
  d = config_lib.default_config().to_dict()
  d["model"]["image"] = "B/16"  # a value where a group is expected
  with pytest.raises(TypeError, match=r"config\.model\.image.*group"):
    validation.validate(_from_dict(d))


def test_caption_objective_needs_coca():
  c = config_lib.default_config()
  c.objectives = {"clip": 1.0, "caption": 2.0}
  assert c.model.name == "two_tower"
  with pytest.raises(ValueError, match="coca"):
    validation.validate(c)
  c.model.name = "coca"
  validation.validate(c)


def test_unknown_objective_model_and_evaluator():
  c = config_lib.default_config()
  c.objectives = {"clp": 1.0}
  with pytest.raises(KeyError, match=r"objective 'clp'.*Did you mean 'clip'"):
    validation.validate(c)
  c = config_lib.default_config()
  c.model.name = "two_towers"
  with pytest.raises(KeyError, match=r"model 'two_towers'.*'two_tower'"):
    validation.validate(c)
  c = config_lib.default_config()
  c.evals = {"ret": {"type": "retrival", "every": 10}}
  with pytest.raises(KeyError, match=r"evaluator 'retrival'.*'retrieval'"):
    validation.validate(c)
  # Without a type, the entry's name is the evaluator.
  c = config_lib.default_config()
  c.evals = {"zeroshot": {"every": 10}}
  validation.validate(c)
  c.evals = {"zero_shot": {"every": 10}}
  with pytest.raises(KeyError, match="zero_shot"):
    validation.validate(c)


def test_eval_entry_with_unknown_key():
  c = config_lib.default_config()
  c.evals = {"retrieval": {"type": "retrieval", "evry": 100}}
  with pytest.raises(KeyError) as e:
    validation.validate(c)
  assert "'config.evals.retrieval.evry'" in str(e.value)
  assert "'every'" in str(e.value)


def test_objective_cfg_for_unselected_objective_and_empty_objectives():
  c = config_lib.default_config()
  c.objective_cfg = {"siglip": {}}
  with pytest.raises(KeyError, match="objective_cfg.siglip"):
    validation.validate(c)
  c = config_lib.default_config()
  c.objectives = {}
  with pytest.raises(ValueError, match="empty"):
    validation.validate(c)


@pytest.mark.parametrize("key", ["batch_size", "total_steps", "log_every"])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_counts(key, value):
  c = config_lib.default_config()
  c[key] = value
  with pytest.raises(ValueError, match=rf"config\.{key} must be positive"):
    validation.validate(c)


def _set(c, path, value):
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


def test_negative_lr_is_a_config_error_naming_key_value_and_range():
  c = config_lib.default_config()
  c.optim.lr = -1.0  # gradient ascent: used to train (away) silently
  with pytest.raises(errors.ConfigError) as e:
    validation.validate(c)
  msg = str(e.value)
  assert "config.optim.lr=-1.0" in msg and ">= 0" in msg and "gradient ascent" in msg
  assert isinstance(e.value, ValueError) and isinstance(e.value, errors.UserError)


@pytest.mark.parametrize("path,value,valid", [
    ("optim.lr", float("nan"), ">= 0"),
    ("optim.lr", float("inf"), ">= 0"),
    ("optim.warmup_steps", -1, "an integer >= 0"),
    ("optim.end_lr_ratio", 1.5, "in [0, 1]"),
    ("optim.end_lr_ratio", -0.1, "in [0, 1]"),
    ("optim.b1", 1.0, "in [0, 1)"),
    ("optim.b1", -0.1, "in [0, 1)"),
    ("optim.b2", 1.0, "in [0, 1)"),
    ("optim.b2", 1.5, "in [0, 1)"),
    ("optim.eps", -1e-8, ">= 0"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("optim.grad_clip_norm", -1.0, "0 = no clipping"),
    ("data.image_size", 0, "an integer >= 1"),
    ("data.image_size", -224, "an integer >= 1"),
    ("data.max_bad_fraction", 1.5, "in [0, 1]"),
    ("data.max_bad_fraction", -0.01, "in [0, 1]"),
    ("data.size", -1, ">= 0"),
    ("data.prefetch", -1, ">= 0"),
    ("checkpoint_every", -1, "0 = only at the end"),
    ("model.embed_dim", 0, ">= 1"),
    ("model.text.context_length", 1, ">= 2"),
    ("model.text.dropout", 1.0, "in [0, 1)"),
    ("model.image.width", -1, "0 = taken from config.model.image.variant"),
    ("model.decoder.num_queries", 0, ">= 1"),
])
def test_out_of_range_value_is_a_config_error(path, value, valid):
  c = config_lib.default_config()
  _set(c, path, value)
  with pytest.raises(errors.ConfigError) as e:
    validation.validate(c)
  msg = str(e.value)
  assert f"config.{path}={value!r} is invalid" in msg, msg
  assert valid in msg, msg


def test_non_integer_warmup_steps_is_a_type_error():
  d = config_lib.default_config().to_dict()
  d["optim"]["warmup_steps"] = 1.5
  with pytest.raises(errors.ConfigTypeError, match=r"config\.optim\.warmup_steps"):
    validation.validate(_from_dict(d))


@pytest.mark.parametrize("scale", [[0.0, 1.0], [0.9, 0.8], [0.5, 1.1], [1.0], [-0.5, 0.5]])
def test_bad_crop_scale(scale):
  c = config_lib.default_config()
  c.data.crop_scale = scale
  with pytest.raises(errors.ConfigError, match=r"config\.data\.crop_scale=.*0 < a <= b <= 1"):
    validation.validate(c)


def test_image_size_zero_fails_at_validation_before_data_is_read():
  # Used to surface only while reading: every record unreadable -> TooManyBadRecords.
  c = config_lib.default_config()
  c.data.source = "jsonl:/nonexistent/train.jsonl"  # never opened by validate()
  c.data.image_size = 0
  with pytest.raises(errors.ConfigError, match=r"config\.data\.image_size=0 is invalid"):
    validation.validate(c)


def test_other_unvalidated_values():
  c = config_lib.default_config()
  c.data.normalization = "clp"
  with pytest.raises(errors.ConfigError, match=r"normalization='clp'.*'clip'"):
    validation.validate(c)
  c = config_lib.default_config()
  c.evals = {"retrieval": common.eval_entry(type="retrieval", batch_size=0)}
  with pytest.raises(errors.ConfigError, match=r"config\.evals\.retrieval\.batch_size=0"):
    validation.validate(c)


def test_normalizations_match_the_transforms():
  from vlp_jax.data import transforms  # pylint: disable=g-import-not-at-top
  assert set(config_lib.NORMALIZATIONS) == set(transforms.NORMALIZATIONS)


def test_boundary_values_with_a_meaning_are_accepted():
  c = config_lib.default_config()
  c.optim.update(lr=0.0, warmup_steps=0, end_lr_ratio=1.0, b1=0.0, b2=0.0, eps=0.0,
                 weight_decay=0.0, grad_clip_norm=0.0)
  c.data.update(max_bad_fraction=1.0, crop_scale=[0.08, 1.0], size=0, prefetch=0)
  c.checkpoint_every = 0
  c.evals = {"retrieval": common.eval_entry(type="retrieval", every=-1)}
  validation.validate(c)
  c.data.max_bad_fraction = 0.0
  validation.validate(c)


def test_every_recipe_passes_the_value_checks():
  recipes = sorted(f for f in os.listdir(os.path.join(REPO_ROOT, "configs"))
                   if f.endswith(".py") and not f.startswith("_") and f != "common.py")
  assert len(recipes) >= len(RECIPES)
  for name in recipes:
    c = _recipe(name[:-3])
    config_lib.check_numbers(c.optim, "config.optim", config_lib.OPTIM_RANGES)
    validation.validate(c)


# -------------------------------------------------------------------------------- CLI


def test_override_errors_in_process():
  demo = os.path.join(REPO_ROOT, "configs", "demo.py")
  assert cli.override_errors(["main.py", f"--config={demo}",
                              "--config.batch_size=8",
                              "--config.model.text.width=64"]) == []
  errors = cli.override_errors(["main.py", f"--config={demo}", "--config.batchsize=8",
                                "--config.optim.lr=1", "--config.model.imag.width=3"])
  assert len(errors) == 2
  assert "'config.batchsize'" in errors[0] and "'batch_size'" in errors[0]
  assert "'config.model.imag'" in errors[1] and "'image'" in errors[1]
  # Overrides may also descend into a value that is not a group.
  errors = cli.override_errors(["main.py", f"--config={demo}", "--config.seed.x=1"])
  assert errors and "'config.seed.x'" in errors[0]
  assert cli.override_errors(["main.py", "--workdir=/tmp"]) == []


def _run_main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
      check=False)
  return proc, proc.stdout + proc.stderr, time.time() - t0


@pytest.mark.parametrize("override,bad,suggestion", [
    ("--config.batchsize=8", "config.batchsize", "batch_size"),
    ("--config.model.text.widht=3", "config.model.text.widht", "width"),
])
def test_cli_unknown_override_fails_fast(tmp_path, override, bad, suggestion):
  workdir = tmp_path / "wd"
  proc, out, seconds = _run_main(f"--workdir={workdir}", override)
  assert proc.returncode != 0, out
  assert bad in out and f"Did you mean '{suggestion}'" in out, out
  assert "Traceback" not in out, out
  # Rejected before any model was built or compiled: no workdir, quick exit.
  assert not workdir.exists()
  assert seconds < 30, seconds


def test_cli_missing_data_file_names_the_path(tmp_path):
  proc, out, _ = _run_main(f"--workdir={tmp_path / 'wd'}",
                           "--config.data.source=jsonl:/nonexistent/train.jsonl",
                           "--config.total_steps=1")
  assert proc.returncode != 0, out
  assert "Data file not found" in out and "Traceback" not in out, out
  assert "/nonexistent/train.jsonl" in out, out


def test_cli_image_size_zero_is_a_config_error_before_data_is_read(tmp_path):
  proc, out, _ = _run_main(f"--workdir={tmp_path / 'wd'}",
                           "--config.data.source=jsonl:/nonexistent/train.jsonl",
                           "--config.data.image_size=0", "--config.total_steps=1")
  assert proc.returncode != 0, out
  assert "config.data.image_size=0 is invalid" in out, out
  assert "Data file not found" not in out and "Traceback" not in out, out
