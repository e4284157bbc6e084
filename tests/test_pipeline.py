"""Tests for the data pipeline: transforms, the jsonl source and the grain stream."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from vlp_jax import cli
from vlp_jax.data import pipeline, sources, tokenizers, transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- transforms


def test_normalize_kinds():
  img = np.array([[[0, 128, 255]]], np.uint8)
  inc = transforms.normalize(img, "inception")
  assert inc.dtype == np.float32 and inc.shape == (1, 1, 3)
  np.testing.assert_allclose(inc[0, 0], [-1.0, 128 / 127.5 - 1.0, 1.0], atol=1e-6)
  unit = transforms.normalize(img, "unit")
  np.testing.assert_allclose(unit[0, 0], [0.0, 128 / 255, 1.0], atol=1e-6)
  clip = transforms.normalize(img, "clip")
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(clip[0, 0], (np.array([0, 128, 255]) / 255 - mean) / std,
                             rtol=1e-5)
  # A mean-coloured pixel maps to ~0 under CLIP normalisation.
  grey = np.round(mean * 255).astype(np.uint8)[None, None]
  assert np.abs(transforms.normalize(grey, "clip")).max() < 0.01
  with pytest.raises(ValueError, match="imagenet"):
    transforms.normalize(img, "imagenet")


def test_resize_center_crop_shapes():
  rng = np.random.default_rng(0)
  for h, w in [(40, 60), (60, 40), (17, 100), (32, 32), (100, 100)]:
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = transforms.resize_center_crop(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8, (h, w)
  same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.resize_center_crop(same, 32), same)


def _bright_bbox(img, thr=128):
  ys, xs = np.nonzero(img[..., 0] > thr)
  return ys.min(), ys.max(), xs.min(), xs.max()


def test_resize_center_crop_keeps_centred_square_centred():
  # 40 x 80 black image, white 20 x 20 square at its centre. Resize to 32 -> 32 x 64,
  # crop the middle 32 columns: the square becomes 16 x 16, centred at (16, 16).
  img = np.zeros((40, 80, 3), np.uint8)
  img[10:30, 30:50] = 255
  out = transforms.resize_center_crop(img, 32)
  y0, y1, x0, x1 = _bright_bbox(out)
  assert abs((y0 + y1) / 2 - 15.5) <= 0.5 and abs((x0 + x1) / 2 - 15.5) <= 0.5
  assert 14 <= y1 - y0 + 1 <= 18 and 14 <= x1 - x0 + 1 <= 18
  # The crop removed the outer columns only: corners are black.
  assert out[0, 0].max() < 30 and out[-1, -1].max() < 30
  # Portrait input: the crop removes rows instead.
  out_t = transforms.resize_center_crop(np.ascontiguousarray(img.transpose(1, 0, 2)), 32)
  y0, y1, x0, x1 = _bright_bbox(out_t)
  assert abs((y0 + y1) / 2 - 15.5) <= 0.5 and abs((x0 + x1) / 2 - 15.5) <= 0.5


def test_off_centre_content_is_cropped_away():
  img = np.zeros((32, 96, 3), np.uint8)
  img[:, :20] = 255  # only in the left third, which the centre crop drops
  assert transforms.resize_center_crop(img, 32).max() < 30


# ---------------------------------------------------------------------- train stream


def _tiny_config(seed=0, context_length=16):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.seed = seed
  c.batch_size = 4
  c.data.image_size = 32
  c.model.text.context_length = context_length
  return c


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.get_tokenizer("bytes")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == {"image", "text", "label", "data_type", "image_id",
                                "_bad_counts", "_seen"}
    for key in ("image", "text", "label", "data_type", "image_id"):
      np.testing.assert_array_equal(x[key], y[key])


def _batches_differ(a, b):
  return any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_train_batch_shapes_and_tokens(tokenizer):
  batch = next(iter(pipeline.train_dataset(_tiny_config(), tokenizer)))
  image, text = batch["image"], batch["text"]
  assert image.shape == (4, 32, 32, 3) and image.dtype == np.float32
  assert text.shape == (4, 16) and text.dtype == np.int32
  # Inception normalisation (the demo's) lies in [-1, 1], and images are not blank.
  assert image.min() >= -1.0 and image.max() <= 1.0
  assert image.std() > 0.05
  assert not np.array_equal(image[0], image[1])
  for row in text:
    assert row[0] == tokenizer.bos_id == 1
    eos = np.nonzero(row == tokenizer.eos_id)[0]
    assert eos.size >= 1 and tokenizer.eos_id == 2
    assert np.all(row[eos[0] + 1:] == 0)
    assert np.all(row[1:eos[0]] >= 3)  # byte tokens only between BOS and EOS
    caption = tokenizer.decode(row)
    assert len(caption) == eos[0] - 1 and caption == caption.lower()
    assert caption.split(" ")[0] in ("a", "an", "there", "two")  # shapes templates


def test_train_batch_padding_with_long_context(tokenizer):
  text = next(iter(pipeline.train_dataset(_tiny_config(context_length=128),
                                          tokenizer)))["text"]
  assert text.shape == (4, 128)
  for row in text:
    eos = int(np.nonzero(row == 2)[0][0])
    assert 3 < eos < 127  # whole caption fits: padding follows EOS
    assert np.all(row[eos + 1:] == 0) and np.all(row[:eos] != 0)
    caption = tokenizer.decode(row)
    assert caption == caption.lower() and len(caption) == eos - 1


def test_train_stream_is_deterministic_and_seeded(tokenizer):
  first = _take(iter(pipeline.train_dataset(_tiny_config(), tokenizer)), 3)
  again = _take(iter(pipeline.train_dataset(_tiny_config(), tokenizer)), 3)
  _assert_batches_equal(first, again)
  other = _take(iter(pipeline.train_dataset(_tiny_config(seed=1), tokenizer)), 3)
  assert _batches_differ(first, other)
  # Consecutive batches are different examples.
  assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_train_stream_resumes_from_state(tokenizer):
  config = _tiny_config()
  uninterrupted = _take(iter(pipeline.train_dataset(config, tokenizer)), 4)
  it = iter(pipeline.train_dataset(config, tokenizer))
  _assert_batches_equal(_take(it, 2), uninterrupted[:2])
  state = it.get_state()
  json.dumps(state)  # saved with every checkpoint
  fresh = iter(pipeline.train_dataset(config, tokenizer))
  fresh.set_state(state)
  resumed = _take(fresh, 2)
  _assert_batches_equal(resumed, uninterrupted[2:])
  assert _batches_differ(resumed, uninterrupted[:2])


# ------------------------------------------------------------------------ jsonl source


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture
def jsonl_dir(tmp_path):
  (tmp_path / "imgs").mkdir()
  Image.fromarray(np.full((20, 30, 3), (255, 0, 0), np.uint8)).save(
      tmp_path / "imgs" / "red.png")
  Image.fromarray(np.full((24, 24, 3), (0, 0, 255), np.uint8)).save(
      tmp_path / "imgs" / "blue.jpg", quality=95)
  Image.fromarray(np.full((16, 40), 128, np.uint8)).save(
      tmp_path / "grey.png")
  _write_jsonl(tmp_path / "train.jsonl", [
      {"image": "imgs/red.png", "caption": "a red image"},
      {"image": "imgs/blue.jpg", "caption": ["a blue image", "blue"]},
      "",  # blank lines are skipped
      {"image": "grey.png", "caption": "grey", "extra": 1},
  ])
  return tmp_path


def test_jsonl_source_items(jsonl_dir):
  path = str(jsonl_dir / "train.jsonl")
  src = sources.make_source("jsonl:" + path, "train", 0, 0, 32)
  assert isinstance(src, sources.JsonlSource)
  assert len(src) == 3
  red, blue, grey = src[0], src[1], src[2]
  assert isinstance(red["image"], bytes)  # Encoded: the transform decodes it.
  red_image, blue_image, grey_image = (transforms.as_image_u8(e["image"])
                                       for e in (red, blue, grey))
  assert red_image.shape == (20, 30, 3) and red_image.dtype == np.uint8
  np.testing.assert_array_equal(red_image[5, 5], [255, 0, 0])
  assert red["text"] == "a red image"
  assert red["key"] == str(jsonl_dir / "imgs" / "red.png")
  assert blue_image.shape == (24, 24, 3)
  assert np.abs(blue_image.astype(int) - [0, 0, 255]).max() < 10  # JPEG
  assert blue["text"] == ["a blue image", "blue"]
  assert grey_image.shape == (16, 40, 3)  # greyscale converted to RGB
  np.testing.assert_array_equal(grey_image[0, 0], [128, 128, 128])
  # `size` keeps the first records.
  assert len(sources.make_source("jsonl:" + path, "train", 2, 0, 32)) == 2


def test_jsonl_relative_paths_resolve_against_the_file_not_cwd(jsonl_dir, monkeypatch):
  monkeypatch.chdir("/")
  src = sources.make_source("jsonl:" + str(jsonl_dir / "train.jsonl"), "train", 0, 0, 32)
  assert transforms.as_image_u8(src[0]["image"]).shape == (20, 30, 3)


def test_jsonl_missing_file_names_path(tmp_path):
  missing = str(tmp_path / "nope" / "train.jsonl")
  with pytest.raises(FileNotFoundError) as e:
    sources.make_source("jsonl:" + missing, "train", 0, 0, 32)
  assert missing in str(e.value)
  with pytest.raises(ValueError, match="needs a path"):
    sources.make_source("jsonl", "train", 0, 0, 32)


@pytest.mark.parametrize("bad_line", [
    "{not json",
    json.dumps({"image": "a.png"}),  # no caption
    json.dumps({"caption": "x"}),  # no image
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line):
  path = str(tmp_path / "bad.jsonl")
  _write_jsonl(path, [{"image": "a.png", "caption": "ok"}, "", bad_line])
  with pytest.raises(ValueError) as e:
    sources.make_source("jsonl:" + path, "train", 0, 0, 32)
  assert f"{path}:3:" in str(e.value)


def test_jsonl_empty_file(tmp_path):
  path = str(tmp_path / "empty.jsonl")
  _write_jsonl(path, ["", "  "])
  with pytest.raises(ValueError, match="no records") as e:
    sources.make_source("jsonl:" + path, "train", 0, 0, 32)
  assert path in str(e.value)


def test_unknown_source_name():
  with pytest.raises(KeyError, match="jsonl"):
    sources.make_source("jsonlines:/x", "train", 0, 0, 32)


def test_train_dataset_on_jsonl(jsonl_dir, tokenizer):
  config = _tiny_config()
  config.data.source = "jsonl:" + str(jsonl_dir / "train.jsonl")
  config.batch_size = 3
  batches = _take(iter(pipeline.train_dataset(config, tokenizer)), 2)
  for b in batches:
    assert b["image"].shape == (3, 32, 32, 3) and b["text"].shape == (3, 16)
    captions = {tokenizer.decode(t) for t in b["text"]}
    # One epoch per batch: every record appears once (blue with either caption).
    assert {"a red image", "grey"} <= captions
    assert captions & {"a blue image", "blue"}


def test_train_shuffle_order_depends_on_seed(jsonl_dir, tokenizer):
  # jsonl records do not depend on the seed, so only the shuffle can differ.
  orders = set()
  for seed in range(4):
    config = _tiny_config(seed=seed)
    config.data.source = "jsonl:" + str(jsonl_dir / "train.jsonl")
    config.batch_size = 3
    image = next(iter(pipeline.train_dataset(config, tokenizer)))["image"]
    orders.add(tuple(tuple(np.round(img.mean((0, 1)), 2)) for img in image))
  assert len(orders) > 1


# ------------------------------------------------------------------------ eval stream


def test_eval_examples_shapes_validation():
  data_cfg = _tiny_config().data
  ds, source = pipeline.eval_examples("shapes", "validation", 5, data_cfg)
  assert len(ds) == 5 and len(source) == 5
  for i in range(5):
    ex = ds[i]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert isinstance(ex["text"], list) and ex["text"]
    assert all(isinstance(t, str) and t for t in ex["text"])
    assert ex["text"] == source[i]["text"] and ex["label"] == source[i]["label"]
    assert 0 <= ex["label"] < 24
  # Same examples, same order, on a second call.
  ds2, _ = pipeline.eval_examples("shapes", "validation", 5, data_cfg)
  np.testing.assert_array_equal(ds2[3]["image"], ds[3]["image"])


def test_eval_examples_skip_unreadable_records(tmp_path):
  root = tmp_path / "d"
  root.mkdir()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "good.png")
  (root / "bad.png").write_bytes(b"not an image")
  lines = [{"image": "good.png", "caption": "a"}, {"image": "bad.png", "caption": "b"},
           {"image": "missing.png", "caption": "c"}, {"image": "good.png", "caption": "d"}]
  (root / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  examples, _ = pipeline.eval_examples(f"jsonl:{root / 'a.jsonl'}", "validation", 0,
                                       _tiny_config().data)
  assert [e["text"] for e in examples] == [["a"], ["d"]]
