"""Tests for the config schema, its validation, the recipes and the CLI's key checks."""
import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from vlp_jax import cli
from vlp_jax import config as config_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("demo", "clip_b16", "siglip_b16", "coca_b16")


def _recipe(name):
  return cli.load_config_file(os.path.join(REPO_ROOT, "configs", f"{name}.py"))


def _from_dict(d):
  """A fresh (type-unconstrained) ConfigDict, as a hand-written config could be."""
  return ml_collections.ConfigDict(d)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_round_trips_through_json(name):
  c = _recipe(name)
  config_lib.validate(c)
  text = json.dumps(config_lib.to_dict(c), sort_keys=True)
  loaded = json.loads(text)
  assert loaded == config_lib.to_dict(c)
  # The saved config.json is itself a valid config.
  config_lib.validate(_from_dict(loaded))
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
  config_lib.validate(config_lib.default_config())


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
    config_lib.validate(c)
  msg = str(e.value)
  assert f"'config.{path}'" in msg
  assert suggestion in msg


def test_check_keys_accepts_the_schema_itself_and_open_groups():
  c = config_lib.default_config()
  c.objectives = {"clip": 1.0, "siglip": 0.5}
  c.objective_cfg = {"siglip": {"anything": 1}}
  config_lib.check_keys(c, config_lib.default_config())
  config_lib.validate(c)


# -------------------------------------------------------------------- types and values


def test_wrong_type_raises_type_error():
  d = config_lib.default_config().to_dict()
  d["batch_size"] = "8"
  with pytest.raises(TypeError, match=r"config\.batch_size.*int"):
    config_lib.validate(_from_dict(d))


def test_wrong_type_nested_and_bool():
  d = config_lib.default_config().to_dict()
  d["optim"]["lr"] = "1e-3"
  with pytest.raises(TypeError, match=r"config\.optim\.lr"):
    config_lib.validate(_from_dict(d))
  d = config_lib.default_config().to_dict()
  d["plot"] = 1  # int where a bool is expected
  with pytest.raises(TypeError, match=r"config\.plot"):
    config_lib.validate(_from_dict(d))
  d = config_lib.default_config().to_dict()
  d["model"]["image"] = "B/16"  # a value where a group is expected
  with pytest.raises(TypeError, match=r"config\.model\.image.*group"):
    config_lib.validate(_from_dict(d))


def test_caption_objective_needs_coca():
  c = config_lib.default_config()
  c.objectives = {"clip": 1.0, "caption": 2.0}
  assert c.model.name == "two_tower"
  with pytest.raises(ValueError, match="coca"):
    config_lib.validate(c)
  c.model.name = "coca"
  config_lib.validate(c)


def test_unknown_objective_model_and_evaluator():
  c = config_lib.default_config()
  c.objectives = {"clp": 1.0}
  with pytest.raises(KeyError, match=r"objective 'clp'.*Did you mean 'clip'"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.model.name = "two_towers"
  with pytest.raises(KeyError, match=r"model 'two_towers'.*'two_tower'"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.evals = {"ret": {"type": "retrival", "every": 10}}
  with pytest.raises(KeyError, match=r"evaluator 'retrival'.*'retrieval'"):
    config_lib.validate(c)
  # Without a type, the entry's name is the evaluator.
  c = config_lib.default_config()
  c.evals = {"zeroshot": {"every": 10}}
  config_lib.validate(c)
  c.evals = {"zero_shot": {"every": 10}}
  with pytest.raises(KeyError, match="zero_shot"):
    config_lib.validate(c)


def test_eval_entry_with_unknown_key():
  c = config_lib.default_config()
  c.evals = {"retrieval": {"type": "retrieval", "evry": 100}}
  with pytest.raises(KeyError) as e:
    config_lib.validate(c)
  assert "'config.evals.retrieval.evry'" in str(e.value)
  assert "'every'" in str(e.value)


def test_objective_cfg_for_unselected_objective_and_empty_objectives():
  c = config_lib.default_config()
  c.objective_cfg = {"siglip": {}}
  with pytest.raises(KeyError, match="objective_cfg.siglip"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.objectives = {}
  with pytest.raises(ValueError, match="empty"):
    config_lib.validate(c)


@pytest.mark.parametrize("key", ["batch_size", "total_steps", "log_every"])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_counts(key, value):
  c = config_lib.default_config()
  c[key] = value
  with pytest.raises(ValueError, match=rf"config\.{key} must be positive"):
    config_lib.validate(c)


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
  assert "FileNotFoundError" in out, out
  assert "/nonexistent/train.jsonl" in out, out
