"""`--mode=eval`: the step to evaluate, where results go, and init_from parameters."""
import json
import os

import pytest

from tests import test_train
from vlp_jax import errors
from vlp_jax.train import evaluation, loop

pytestmark = pytest.mark.usefixtures("shared_compilations")


def eval_config(**init_from):
  c = test_train.tiny_config()
  c.evals = {"zeroshot": test_train.tiny_config(evals=True).evals.zeroshot}
  c.init_from.update(init_from)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An 8-step run with checkpoints at steps 4 and 8 and no evaluation."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.run(test_train.tiny_config(), workdir)
  return workdir


def read(path):
  with open(path, "rb") as f:
    return f.read()


def test_results_go_to_eval_step_dir_and_never_to_metrics_jsonl(trained):
  metrics_before = read(os.path.join(trained, "metrics.jsonl"))
  latest = loop.evaluate(eval_config(), trained)
  at_4 = loop.evaluate(eval_config(), trained, step=4)
  assert read(os.path.join(trained, "metrics.jsonl")) == metrics_before
  for step, results in ((8, latest), (4, at_4)):
    saved = evaluation.read_results(os.path.join(trained, "eval", f"step_{step}"))
    assert saved["step"] == step
    assert saved["params_from"].endswith(os.path.join("checkpoints", str(step)))
    assert saved["metrics"] == pytest.approx(results)
    assert 0.0 <= saved["metrics"]["eval/zeroshot/top1"] <= 1.0
    with open(os.path.join(trained, "eval", f"step_{step}", "config.json")) as f:
      assert json.load(f)["evals"]["zeroshot"]["size"] == 24


def test_eval_dir_and_a_missing_step(trained, tmp_path):
  out = str(tmp_path / "elsewhere")
  loop.evaluate(eval_config(), trained, step=8, eval_dir=out)
  assert evaluation.read_results(out)["step"] == 8
  with pytest.raises(errors.WorkdirError, match=r"No checkpoint at step 5 .*\[4, 8\]"):
    loop.evaluate(eval_config(), trained, step=5)


def test_init_from_parameters_are_evaluated_without_a_checkpoint(trained, tmp_path):
  """A workdir without checkpoints evaluates what config.init_from names: here another
  run's step 4, which gives that checkpoint's own figures."""
  fresh = str(tmp_path / "imported")
  results = loop.evaluate(eval_config(workdir=trained, step=4), fresh)
  saved = evaluation.read_results(os.path.join(fresh, "eval", "init_from"))
  assert saved["step"] == 0 and saved["params_from"] == f"init_from {trained}"
  assert saved["metrics"] == pytest.approx(results)
  direct = loop.evaluate(eval_config(), trained, step=4, eval_dir=str(tmp_path / "d"))
  assert results == pytest.approx(direct)
  assert sorted(os.listdir(fresh)) == ["eval"]  # No checkpoints/, lock or config.json.
  # Parameters init_from does not select keep a fresh initialisation.
  part = loop.evaluate(eval_config(workdir=trained, include=["img/.*"]), fresh,
                       eval_dir=str(tmp_path / "part"))
  assert 0.0 <= part["eval/zeroshot/top1"] <= 1.0
  with pytest.raises(errors.WorkdirError, match="--step=4 names a checkpoint"):
    loop.evaluate(eval_config(workdir=trained), str(tmp_path / "other"), step=4)
  with pytest.raises(errors.WorkdirError, match="does not exist.*config.init_from"):
    loop.evaluate(eval_config(), str(tmp_path / "typo"))
  assert not os.path.exists(tmp_path / "typo")


def test_a_checkpoint_evaluated_at_another_resolution(trained, tmp_path):
  """data.image_size 32 -> 48: the 4x4 grid of positions is resized to 6x6."""
  c = eval_config()
  c.data.image_size = 48
  results = loop.evaluate(c, trained, eval_dir=str(tmp_path / "48px"))
  assert 0.0 <= results["eval/zeroshot/top1"] <= 1.0
  assert evaluation.read_results(str(tmp_path / "48px"))["step"] == 8
  c.model.text.width = 48  # Anything else that differs is still the clear error.
  with pytest.raises(errors.CheckpointError, match="does not match the model"):
    loop.evaluate(c, trained, eval_dir=str(tmp_path / "bad"))


def test_zeroshot_predictions_for_display(trained):
  c = eval_config()
  exp = loop.Experiment(c, trained)
  params, step, _ = loop.eval_params(exp, trained)
  assert step == 8
  from vlp_jax.evaluators import zeroshot  # pylint: disable=g-import-not-at-top
  pred = zeroshot.top_predictions(exp.predict_fns, params,
                                  exp.eval_configs()["zeroshot"], num=5, k=3,
                                  mesh=exp.mesh)
  assert pred["images"].shape == (5, 32, 32, 3) and pred["top"].shape == (5, 3)
  assert len(pred["class_names"]) == 24 and (pred["labels"] >= 0).all()
  assert (pred["probs"][:, 0] >= pred["probs"][:, 1]).all() and (pred["probs"] <= 1).all()
  # The evaluator's top-1 over the same five images agrees.
  c.evals.zeroshot.size = 5
  results = loop.evaluate(c, trained, eval_dir=os.path.join(trained, "five"))
  assert results["eval/zeroshot/top1"] == pytest.approx(
      (pred["top"][:, 0] == pred["labels"]).mean())


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "interop")
# format -> (weights, options the arrays cannot tell, objectives, pixel normalization).
IMPORTED = {
    "openai": ("clip/openai.safetensors", dict(image_heads=2, text_heads=2),
               {"clip": 1.0}, "clip"),
    "open_clip": ("clip/open_clip.safetensors", dict(image_heads=2, text_heads=2),
                  {"clip": 1.0}, "clip"),
    "hf_clip": ("clip/hf_clip", {}, {"clip": 1.0}, "clip"),
    "hf_siglip": ("siglip", {}, {"siglip": 1.0}, "inception"),
    "big_vision": ("siglip/big_vision.npz", {}, {"siglip": 1.0}, "inception"),
    "open_clip_coca": ("coca/coca.safetensors",
                       dict(image_heads=3, text_heads=2, pool_heads=4),
                       {"clip": 1.0, "caption": 2.0}, "clip"),
}


# One model compilation each (~6 s); big_vision and hf_siglip share one (the same
# model), openai stands for the CLIP formats; the others are slow.
FAST_IMPORTS = ("big_vision", "hf_siglip", "openai")


@pytest.mark.parametrize("fmt", [
    f if f in FAST_IMPORTS else pytest.param(f, marks=pytest.mark.slow)
    for f in sorted(IMPORTED)])
def test_eval_of_imported_weights(fmt, tmp_path):
  """--mode=eval of another library's checkpoint (config.init_from.format): the tiny
  random models of tests/fixtures/interop, on shapes."""
  from vlp_jax import interop  # pylint: disable=g-import-not-at-top
  path, options, objectives, normalization = IMPORTED[fmt]
  weights = os.path.join(FIXTURES, path)
  model_cfg, _, size = interop.load(fmt, weights, **options)
  c = eval_config(format=fmt, checkpoint=weights)
  c.model = model_cfg
  c.objectives = objectives
  c.data.update(image_size=size, normalization=normalization)
  if c.model.text.pool == "argmax":  # The shapes tokenizer's EOS is not its highest id:
    c.model.text.update(pool="eos", padding_mask=True)  # the same token, by position.
  results = loop.evaluate(c, str(tmp_path))
  saved = evaluation.read_results(str(tmp_path / "eval" / "init_from"))
  assert saved["params_from"] == f"init_from {fmt} {weights}" and saved["step"] == 0
  assert saved["metrics"] == pytest.approx(results)
  assert 0.0 <= results["eval/zeroshot/top1"] <= 1.0
