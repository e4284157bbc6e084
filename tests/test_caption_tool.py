"""tools/caption.py and the captioning evaluator's decoding options (method, beam
size, length penalty, top_p, temperature, max_len, seed)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tests import test_train, tool_modules
from vlp_jax import config as config_lib, errors, validation
from vlp_jax.train import checkpoint, evaluation, loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("shared_compilations")


def load_tool():
  return tool_modules.load("caption")


caption = load_tool()


# ------------------------------------------------------------- evaluator options


def _config(**entry):
  c = config_lib.default_config()
  c.model.name = "coca"
  c.model.text.context_length = 24
  c.evals = {"cap": dict(type="captioning", source="shapes", size=6, batch_size=4,
                         **entry)}
  return c


@pytest.mark.parametrize("entry,pattern", [
    ({"method": "topk"}, r"cap\.method='topk' is not one of"),
    ({"beam_size": 0}, r"cap\.beam_size=0 is invalid"),
    ({"top_p": 0.0}, r"cap\.top_p=0.0 is invalid"),
    ({"temperature": 0.0}, r"cap\.temperature=0.0 is invalid"),
    ({"temperature": 1e-4}, r"cap\.temperature=0.0001 is invalid.*>= 0.001"),
    ({"seed": 2**31}, r"cap\.seed=2147483648 is invalid"),
    ({"length_penalty": -1.0}, r"cap\.length_penalty=-1.0 is invalid"),
    ({"max_len": 1}, r"cap\.max_len=1 is invalid"),
    ({"max_len": 25}, r"cap\.max_len=25 exceeds config\.model\.text\.context_length=24"),
])
def test_bad_decode_options_are_config_errors(entry, pattern):
  with pytest.raises(errors.ConfigError, match=pattern):
    validation.validate(_config(**entry))


def test_decode_options_reach_generate():
  c = _config(method="sample", top_p=0.5, temperature=0.7, max_len=10, seed=3)
  validation.validate(c)
  calls = []

  def generate(params, images, **kw):
    calls.append(kw)
    return np.ones((len(images), 10), np.int32)

  fns = {"generate": generate, "detokenize": lambda t: "a red circle"}
  results = evaluation.run_evals(evaluation.eval_configs(c), fns, None, 0)
  assert "eval/cap/cider" in results
  assert [kw.pop("seed") for kw in calls] == [3, 4]  # Batch i: seed + i.
  assert calls[0] == dict(method="sample", beam_size=4, length_penalty=0.6, top_p=0.5,
                          temperature=0.7, max_len=10, where="config.evals.cap.")
  c.evals.cap.seed, calls[:] = 2**31 - 1, []
  evaluation.run_evals(evaluation.eval_configs(c), fns, None, 0)
  assert [kw["seed"] for kw in calls] == [2**31 - 1, 0]  # Wraps: stays int32.


# ---------------------------------------------------------- a trained tiny CoCa run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir of test_train's tiny CoCa as a run leaves it (config.json, a
  checkpoint), with its initial state saved at step 0 instead of training (the
  captions need not mean anything; no train step to compile)."""
  workdir = str(tmp_path_factory.mktemp("caption_run"))
  c = test_train.tiny_config(total_steps=2)
  exp = loop.Experiment(c, workdir)
  loop._write_config(c, workdir)  # pylint: disable=protected-access
  manager = checkpoint.make_manager(workdir, c)
  checkpoint.save(manager, 0, exp.create_state(), force=True)
  checkpoint.wait_for_saves(manager)
  manager.close()
  return workdir


@pytest.fixture(scope="module")
def run(trained):
  return caption.load_run(trained)


def _images(folder, n=3):
  os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
  rng = np.random.default_rng(0)
  names = [f"{i}.png" for i in range(n - 1)] + [os.path.join("sub", "z.jpg")]
  for name in names:
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
        os.path.join(folder, name))
  with open(os.path.join(folder, "broken.png"), "wb") as f:
    f.write(b"not a png")
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write("not an image")
  return [os.path.join(folder, n) for n in names]


def test_list_images_folder_and_jsonl(tmp_path):
  good = _images(str(tmp_path))
  listed = caption.list_images(str(tmp_path))
  assert listed == [(p, p) for p in sorted(good + [str(tmp_path / "broken.png")])]
  lines = [{"image": "0.png", "caption": "x"}, {"image": "sub/z.jpg"}]
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
  # Names: the lines' own values (to join on); paths: relative to the file.
  assert caption.list_images(f"jsonl:{tmp_path}/a.jsonl") == [
      ("0.png", os.path.join(str(tmp_path), "0.png")),
      ("sub/z.jpg", os.path.join(str(tmp_path), "sub/z.jpg"))]
  (tmp_path / "b.jsonl").write_text('{"file": "0.png"}\n')
  with pytest.raises(errors.DataError, match=r"b\.jsonl:1: expected a JSON object"):
    caption.list_images(f"jsonl:{tmp_path}/b.jsonl")
  (tmp_path / "c.jsonl").write_bytes(b'{"image": "0.png"}\n{"image": "\xff.png"}\n')
  with pytest.raises(errors.DataError, match=r"c\.jsonl: not UTF-8 text"):
    caption.list_images(f"jsonl:{tmp_path}/c.jsonl")
  with pytest.raises(errors.DataPathError, match="no such file"):
    caption.list_images(f"jsonl:{tmp_path}/missing.jsonl")
  with pytest.raises(errors.DataPathError, match="neither a folder"):
    caption.list_images(str(tmp_path / "nothing"))


def test_missing_workdir_and_non_captioning_model(tmp_path):
  with pytest.raises(errors.WorkdirError, match="Workdir not found"):
    caption.load_run(str(tmp_path / "nope"))
  with pytest.raises(errors.WorkdirError, match="has no config.json"):
    caption.load_run(str(tmp_path))
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  (tmp_path / "config.json").write_text(json.dumps(config_lib.to_dict(c)))
  with pytest.raises(errors.ConfigError, match="has no text decoder"):
    caption.load_run(str(tmp_path))


def test_caption_images_greedy(run, tmp_path):
  exp, params, _ = run
  good = _images(str(tmp_path))
  images = caption.list_images(str(tmp_path))
  out, skipped = caption.caption_images(exp, params, images, batch_size=2)
  assert [p for p, _ in out] == sorted(good)
  assert skipped and skipped[0][0].endswith("broken.png")
  assert all(isinstance(c, str) for _, c in out)
  # A jsonl's names come back as given.
  named = [("a", good[0]), ("b", good[1])]
  assert [n for n, _ in caption.caption_images(exp, params, named, 2)[0]] == ["a", "b"]
  with pytest.raises(errors.DataError, match="broken.png.*--on_bad=skip"):
    caption.caption_images(exp, params, images, batch_size=2, on_bad="fail")
  with pytest.raises(errors.ConfigError, match=r"--max_len=99 is invalid"):
    caption.caption_images(exp, params, named, 2, max_len=99)


@pytest.mark.slow
def test_caption_images_beam_and_sample(run, tmp_path):
  exp, params, _ = run
  good = [(p, p) for p in _images(str(tmp_path))]
  beam, _ = caption.caption_images(exp, params, good, 4, method="beam", beam_size=2,
                                   max_len=8)
  s1, _ = caption.caption_images(exp, params, good, 4, seed=1, method="sample",
                                 top_p=1.0, temperature=1.5, max_len=8)
  s2, _ = caption.caption_images(exp, params, good, 4, seed=1, method="sample",
                                 top_p=1.0, temperature=1.5, max_len=8)
  assert s1 == s2 and len(beam) == 3


def test_evaluator_max_len_caps_the_captions(run):
  """max_len=4: BOS + at most 3 tokens (the tokens' shape says so)."""
  exp, params, _ = run
  fns = exp.predict_fns
  images = np.zeros((2, 32, 32, 3), np.float32)
  with jax.set_mesh(exp.mesh):
    assert np.asarray(fns["generate"](params, images, max_len=4)).shape == (2, 4)
    assert np.asarray(fns["generate"](params, images)).shape == (2, 24)


@pytest.mark.slow
def test_tool_command_line(trained, tmp_path):
  _images(str(tmp_path / "imgs"))
  out = str(tmp_path / "caps.jsonl")
  proc = subprocess.run(
      [sys.executable, "tools/caption.py", f"--workdir={trained}",
       f"--images={tmp_path}/imgs", f"--out={out}", "--method=beam", "--beam_size=2",
       "--batch_size=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "wrote 3 captions" in proc.stdout and "broken.png" in proc.stdout
  rows = [json.loads(l) for l in open(out)]
  assert [os.path.basename(r["image"]) for r in rows] == ["0.png", "1.png", "z.jpg"]
  proc = subprocess.run(
      [sys.executable, "tools/caption.py", f"--workdir={tmp_path}/none",
       f"--images={tmp_path}/imgs", f"--out={out}"], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 1 and "error: Workdir not found" in proc.stderr
