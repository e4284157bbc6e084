"""Evaluators take their own options: registered defaults, checks, the config path
(configs/common.py:eval_entry -> vlp_jax/train/evaluation.py) and zero-shot templates."""
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import common
from vlp_jax import config as config_lib, errors, evaluators, validation
from vlp_jax.data import shapes
from vlp_jax.evaluators import templates
from vlp_jax.registry import EVALUATORS
from vlp_jax.train import evaluation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**evals):
  c = config_lib.default_config()
  c.data.image_size = 32
  c.evals = evals
  return c


class _Recorder:
  """Stub predict fns: records every text embedded; deterministic embeddings."""

  def __init__(self):
    self.texts = []

  def fns(self):
    def tokenize(texts):
      start = len(self.texts)
      self.texts.extend(texts)
      return np.arange(start, start + len(texts), dtype=np.int32)[:, None]

    def embed_text(params, tokens):
      del params
      return np.cos(np.asarray(tokens, np.float32) + np.arange(4, dtype=np.float32)) + 2

    def embed_image(params, images):
      del params
      return np.asarray(images, np.float32).reshape(len(images), -1)[:, :4] + 1
    return {"tokenize": tokenize, "embed_text": embed_text, "embed_image": embed_image}


def _run(config, name):
  rec = _Recorder()
  validation.validate(config)
  results = evaluation.run_evals(evaluation.eval_configs(config), rec.fns(), None, 0,
                                 names=[name])
  return rec.texts, results


def _imagefolder(root, classes=("red_thing", "blue_thing")):
  for i, name in enumerate(classes):
    os.makedirs(root / name)
    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / name / "0.png")
  return root


# ---------------------------------------------------------------------- import, entries


def test_importing_evaluators_and_recipes_does_not_import_grain():
  code = ("import sys\nimport vlp_jax.evaluators\nfrom configs import common, demo\n"
          "demo.get_config(); common.eval_entry(type='zeroshot')\n"
          "bad = [m for m in ('grain', 'vlp_jax.data.pipeline') if m in sys.modules]\n"
          "assert not bad, bad\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_eval_entry_holds_each_evaluators_options():
  zs = common.eval_entry(type="zeroshot")
  assert set(zs) == set(config_lib.EVAL_COMMON_KEYS) | {"templates", "classnames",
                                                        "class_subset"}
  assert zs.type == "zeroshot" and zs.templates == ()
  assert common.eval_entry(type="captioning").log_examples == 5
  assert set(common.eval_entry(type="retrieval")) == set(config_lib.EVAL_COMMON_KEYS) | {
      "ks", "group_by_image"}
  # A string for a tuple option is a one-element tuple (the command line's type).
  assert common.eval_entry(type="zeroshot", templates="imagenet").templates == ("imagenet",)
  assert common.eval_entry(type="zeroshot", templates=["a {}."]).templates == ("a {}.",)


def test_templates_override_from_the_command_line(monkeypatch):
  demo = os.path.join(REPO_ROOT, "configs", "demo.py")
  for value, expected in [("imagenet", ("imagenet",)),
                          ("('a {} here.', 'the {}.')", ("a {} here.", "the {}."))]:
    argv = ["main.py", f"--config={demo}", f"--config.evals.zeroshot.templates={value}"]
    assert not cli_errors(argv)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides there.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(argv)
    assert fv.config.evals.zeroshot.templates == expected
    validation.validate(fv.config)


def cli_errors(argv):
  from vlp_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.override_errors(argv)


# ------------------------------------------------------------------------------ checks


def test_unknown_option_key_names_the_key_the_closest_and_the_valid_keys():
  c = _config(zeroshot=common.eval_entry(type="zeroshot"))
  c.evals.zeroshot.templats = ("a {}.",)
  with pytest.raises(errors.ConfigKeyError) as e:
    validation.validate(c)
  msg = str(e.value)
  assert "'config.evals.zeroshot.templats'" in msg and "Did you mean 'templates'" in msg
  assert "zeroshot's options ['class_subset', 'classnames', 'templates']" in msg and "'batch_size'" in msg
  # Another evaluator's option, and a removed key, say so.
  c = _config(zeroshot={"every": 0, "log_examples": 3})
  with pytest.raises(errors.ConfigKeyError, match=r"option of \['captioning'\]"):
    validation.validate(c)
  # max_len works now (tests/test_caption_tool.py): capped by the context length.
  c = _config(cap={"type": "captioning", "max_len": 100})
  with pytest.raises(errors.ConfigError, match=r"config\.evals\.cap\.max_len=100 exceeds"):
    validation.validate(c)


@pytest.mark.parametrize("value,error,pattern", [
    (("a {}.", "a photo"), errors.ConfigError, r"'a photo' is invalid: it has no '\{\}'"),
    (("a {} and a {}.",), errors.ConfigError, "2 fields"),
    (("a {name}.",), errors.ConfigError, r"the field \{name\}"),
    (("a {.",), errors.ConfigError, "unmatched brace"),
    (("imagenett",), errors.ConfigError, "Did you mean 'imagenet'"),
    (("/nonexistent/templates.txt",), errors.DataPathError, "not found"),
    (3, errors.ConfigTypeError, "must be a list of templates"),
])
def test_bad_templates_are_config_errors(value, error, pattern):
  c = _config(zeroshot={"templates": value})
  with pytest.raises(error, match=pattern) as e:
    validation.validate(c)
  assert "config.evals.zeroshot.templates" in str(e.value)


def test_templates_file_is_checked(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("# only a comment\n\n")
  with pytest.raises(errors.ConfigError, match="holds no templates"):
    validation.validate(_config(zeroshot={"templates": str(path)}))
  path.write_text("a {}.\nno placeholder\n")
  with pytest.raises(errors.ConfigError, match="'no placeholder' is invalid"):
    validation.validate(_config(zeroshot={"templates": (str(path),)}))


# --------------------------------------------------------------------------- templates


def test_user_templates_are_the_prompts():
  user = ("a drawing of a {}.", "{}, seen from above")
  c = _config(zeroshot=common.eval_entry(type="zeroshot", size=24, batch_size=8,
                                         templates=user))
  texts, results = _run(c, "zeroshot")
  assert texts == [t.format(n) for n in shapes.CLASS_NAMES for t in user]
  assert results["eval/zeroshot/num_examples"] == 24
  assert 0 <= results["eval/zeroshot/top1"] <= results["eval/zeroshot/top5"] <= 1


def test_default_templates_per_source_and_named_sets():
  # shapes: its built-in set (with "an"), as before templates were an option.
  texts, _ = _run(_config(zeroshot={"size": 24}), "zeroshot")
  assert texts == [p for n in shapes.CLASS_NAMES
                   for p in templates.Templates(templates.SHAPES, "", True).prompts(n)]
  assert "a photo of an orange cross." in texts
  texts, _ = _run(_config(zeroshot={"size": 24, "templates": "imagenet"}), "zeroshot")
  assert texts == [t.format(n) for n in shapes.CLASS_NAMES for t in templates.IMAGENET]


def test_templates_txt_beside_an_imagefolder_is_used(tmp_path):
  root = _imagefolder(tmp_path / "folder")
  spec = f"imagefolder:{root}"
  texts, results = _run(_config(zs={"type": "zeroshot", "source": spec}), "zs")
  assert texts == [t.format(n) for n in ("blue thing", "red thing")
                   for t in templates.IMAGENET]  # No file: the default set.
  assert results["eval/zs/num_examples"] == 2
  (root / "templates.txt").write_text("# mine\na sketch of a {}.\n\n{} in the wild\n")
  texts, _ = _run(_config(zs={"type": "zeroshot", "source": spec}), "zs")
  assert texts == ["a sketch of a blue thing.", "blue thing in the wild",
                   "a sketch of a red thing.", "red thing in the wild"]
  # Templates in the config win over the file.
  texts, _ = _run(_config(zs={"type": "zeroshot", "source": spec,
                              "templates": ["the {}."]}), "zs")
  assert texts == ["the blue thing.", "the red thing."]
  (root / "templates.txt").write_text("a {}.\nno class here\n")
  with pytest.raises(errors.DataError, match=r"templates\.txt.*'no class here'"):
    _run(_config(zs={"type": "zeroshot", "source": spec}), "zs")


# ------------------------------------------------- an evaluator registered by a test


@pytest.fixture
def echo_evaluator():
  def check(cfg, where):
    if not 0 <= cfg.threshold <= 1:
      raise errors.ConfigError(f"{where}.threshold={cfg.threshold} must be in [0, 1].")

  @EVALUATORS.register("test_echo", replace=True,
                       options={"threshold": 0.5, "tags": ("a",)}, check=check)
  def echo(predict_fns, params, cfg):
    del predict_fns, params
    return {"threshold": cfg.threshold, "tags": len(cfg.tags), "every": cfg.every}
  yield echo
  EVALUATORS._table.pop("test_echo")  # pylint: disable=protected-access
  EVALUATORS._info.pop("test_echo")  # pylint: disable=protected-access


def test_a_new_evaluator_gets_its_options_through_the_config(echo_evaluator):
  del echo_evaluator
  c = _config(echo=common.eval_entry(type="test_echo", every=3, threshold=0.25),
              off=common.eval_entry(type="test_echo", every=-1))
  assert c.evals.echo.tags == ("a",)
  validation.validate(c)
  evals = evaluation.eval_configs(c)
  assert list(evals) == ["echo"]  # every < 0: off.
  cfg = evals["echo"]
  assert (cfg.type, cfg.name, cfg.threshold, cfg.source) == ("test_echo", "echo", 0.25,
                                                             c.data.source)
  assert evaluation.run_evals(evals, {}, None, step=3) == {
      "eval/echo/threshold": 0.25, "eval/echo/tags": 1, "eval/echo/every": 3}
  # Its unknown keys and bad values are rejected, naming its options.
  c.evals.echo.treshold = 0.1
  with pytest.raises(errors.ConfigKeyError) as e:
    evaluators.check_config(c)
  assert "Did you mean 'threshold'" in str(e.value)
  assert "test_echo's options ['tags', 'threshold']" in str(e.value)
  del c.evals.echo["treshold"]
  c.evals.echo.threshold = 2.0
  with pytest.raises(errors.ConfigError, match=r"config\.evals\.echo\.threshold=2\.0"):
    validation.validate(c)
  c = _config(echo={"type": "test_echo", "threshold": "high"})
  with pytest.raises(errors.ConfigTypeError, match=r"config\.evals\.echo\.threshold"):
    validation.validate(c)
