"""Retrieval on user files with several captions per image (the COCO / Flickr30k
Karpathy protocol): jsonl caption lists, csv tables with one row per caption, and
tools/karpathy_to_jsonl.py. Images are written by the tests; stub embeddings make
the expected recalls exact."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from tests import tool_modules
from vlp_jax import config as config_lib, errors, validation
from vlp_jax.evaluators import retrieval
from vlp_jax.train import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6  # Images; image i is solid red 40 * i, its captions say "photo i".


def _tool():
  return tool_modules.load("karpathy_to_jsonl")


def _captions():
  """Three right captions per image; image 2 has a fourth that names image 4."""
  caps = {i: [f"photo {i} take {k}" for k in range(3)] for i in range(N)}
  caps[2].append("photo 4 mislabelled")
  return caps


def _write_images(folder):
  os.makedirs(folder, exist_ok=True)
  for i in range(N):
    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(os.path.join(folder, f"{i}.png"))


def _stub_fns():
  """Image i -> one-hot(i) (from its red value); 'photo j ...' -> one-hot(j)."""
  texts = []

  def tokenize(batch):
    start = len(texts)
    texts.extend(batch)
    return np.arange(start, start + len(batch), dtype=np.int32)[:, None]

  def embed_text(params, tokens):
    ids = [int(texts[t].split()[1]) for t in np.asarray(tokens)[:, 0]]
    return np.eye(N, dtype=np.float32)[ids]

  def embed_image(params, images):  # 'unit' normalisation: x = red / 255.
    ids = np.round(np.asarray(images)[:, :, :, 0].mean(axis=(1, 2)) * 255 / 40)
    return np.eye(N, dtype=np.float32)[ids.astype(int)]
  return {"tokenize": tokenize, "embed_text": embed_text, "embed_image": embed_image}


def _evaluate(source, **options):
  c = config_lib.default_config()
  c.data.update(image_size=8, normalization="unit")
  c.evals = {"ret": common.eval_entry(type="retrieval", source=source, split="test",
                                      batch_size=4, **options)}
  validation.validate(c)
  out = evaluation.run_evals(evaluation.eval_configs(c), _stub_fns(), None, 0)
  return {k.split("/")[-1]: v for k, v in out.items()}


# 19 captions: the mislabelled one ranks image 4 above its own (t2i miss at 1, hit at
# 5); every image has a caption of its own at the top (i2t all hits).
EXPECTED = {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 18 / 19, "t2i_r5": 1.0,
            "num_images": N, "num_texts": 19}


def _check(result, expected=EXPECTED):
  for k, v in expected.items():
    assert result[k] == pytest.approx(v), k


def test_jsonl_caption_lists(tmp_path):
  _write_images(tmp_path / "img")
  with open(tmp_path / "test.jsonl", "w") as f:
    for i, caps in _captions().items():
      f.write(json.dumps({"image": f"img/{i}.png", "caption": caps}) + "\n")
  _check(_evaluate(f"jsonl:{tmp_path}/test.jsonl", ks=(1, 5)))


def _write_csv(tmp_path):
  _write_images(tmp_path / "img")
  with open(tmp_path / "test.csv", "w") as f:
    f.write("filepath,title\n")
    for i, caps in _captions().items():
      for cap in caps:
        f.write(f"img/{i}.png,{cap}\n")
  return f"csv:{tmp_path}/test.csv"


def test_csv_rows_of_one_image_are_one_image(tmp_path):
  source = _write_csv(tmp_path)
  _check(_evaluate(source, ks=(1, 5)))
  # Without grouping every row is an image of its own (duplicates compete).
  ungrouped = _evaluate(source, ks=(1, 5), group_by_image=False)
  assert ungrouped["num_images"] == ungrouped["num_texts"] == 19
  assert ungrouped["i2t_r1"] < 1.0
  # `size` counts records: 7 rows are images 0, 1 (3 captions each) and 2 (one).
  _check(_evaluate(source, ks=(1,), size=7),
         {"num_images": 3, "num_texts": 7, "i2t_r1": 1.0, "t2i_r1": 1.0})


def test_group_captions_keeps_first_appearance_order():
  examples = [{"key": "a", "text": ["a1"]}, {"key": "b", "text": ["b1", "b2"]},
              {"key": "a", "text": ["a2"]}, {"text": ["c1"]}]
  images, texts, owner = retrieval.group_captions(examples, by_key=True)
  assert images == [0, 1, 3] and texts == ["a1", "b1", "b2", "a2", "c1"]
  assert owner.tolist() == [0, 1, 1, 0, 2]
  images, _, owner = retrieval.group_captions(examples, by_key=False)
  assert images == [0, 1, 2, 3] and owner.tolist() == [0, 1, 1, 2, 3]


def test_bad_ks_is_a_config_error():
  c = config_lib.default_config()
  c.evals = {"ret": common.eval_entry(type="retrieval", ks=(0, 5))}
  with pytest.raises(errors.ConfigError, match=r"config\.evals\.ret\.ks=\(0, 5\)"):
    validation.validate(c)


# -------------------------------------------------------------- tools/karpathy_to_jsonl


def _karpathy(tmp_path):
  """A dataset_coco.json-like file: images 0-5 in 'test' (COCO's filepath), 6 in
  'train', 7 in 'restval'; images under tmp_path/coco/val2014."""
  _write_images(tmp_path / "coco" / "val2014")
  caps = _captions()
  images = [{"filepath": "val2014", "filename": f"{i}.png", "split": "test",
             "sentences": [{"raw": c + " ", "tokens": c.split()} for c in caps[i]]}
            for i in range(N)]
  images += [{"filepath": "val2014", "filename": "0.png", "split": s,
              "sentences": [{"raw": "photo 0 again"}]} for s in ("train", "restval")]
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}))
  return str(path)


def test_karpathy_to_jsonl_then_retrieval(tmp_path):
  tool = _tool()
  out = tmp_path / "out" / "coco_test.jsonl"
  n = tool.convert(_karpathy(tmp_path), str(tmp_path / "coco"), ["test"], str(out))
  assert n == N
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines[0] == {"image": "../coco/val2014/0.png",
                      "caption": ["photo 0 take 0", "photo 0 take 1", "photo 0 take 2"]}
  _check(_evaluate(f"jsonl:{out}", ks=(1, 5)))
  assert tool.convert(_karpathy(tmp_path), str(tmp_path / "coco"), ["train", "restval"],
                      str(tmp_path / "train.jsonl")) == 2


def test_karpathy_to_jsonl_errors(tmp_path):
  tool = _tool()
  ann = _karpathy(tmp_path)
  with pytest.raises(tool.ConvertError, match=r"6 of 6 images not found under .*"
                     r"val2014/"):
    tool.convert(ann, str(tmp_path), ["test"], str(tmp_path / "x.jsonl"))
  with pytest.raises(tool.ConvertError, match=r"Unknown split\(s\) \['tset'\]"):
    tool.convert(ann, str(tmp_path / "coco"), ["tset"], str(tmp_path / "x.jsonl"))
  (tmp_path / "other.json").write_text('{"annotations": []}')
  with pytest.raises(tool.ConvertError, match="not a Karpathy split file"):
    tool.convert(str(tmp_path / "other.json"), str(tmp_path), ["test"],
                 str(tmp_path / "x.jsonl"))
  # The command line prints the error, not a traceback.
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "karpathy_to_jsonl.py"),
       f"--input={ann}", f"--images_root={tmp_path}", f"--output={tmp_path}/x.jsonl"],
      capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and "error: 6 of 6 images not found" in proc.stderr
  assert "Traceback" not in proc.stderr
