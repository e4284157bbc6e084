"""Tests for the csv, imagefolder, arrayrecord and tfds sources."""
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from vlp_jax import cli, errors
from vlp_jax.data import pipeline, sources, sources_arrayrecord, sources_tfds, tokenizers
from vlp_jax.data import transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
          "white": (255, 255, 255)}


def _tiny_config(source, seed=0):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.seed = seed
  c.batch_size = 4
  c.data.image_size = 32
  c.model.text.context_length = 16
  c.data.source = source
  return c


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.get_tokenizer("bytes")


def _save(path, color, size=(20, 30), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(size + (3,), COLORS[color], np.uint8)).save(path, format=fmt)


def _check_train_batches(spec, tokenizer, allowed_captions, n=2, labels=None,
                         class_templates="auto"):
  """`labels`: the batch labels allowed (classification sources); None: caption data."""
  config = _tiny_config(spec)
  config.data.class_templates = class_templates
  it = iter(pipeline.train_dataset(config, tokenizer))
  for _ in range(n):
    batch = next(it)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == np.int32
    assert {tokenizer.decode(t) for t in batch["text"]} <= set(allowed_captions)
    for key in ("label", "data_type", "image_id"):
      assert batch[key].shape == (4,) and batch[key].dtype == np.int32
    assert set(batch["label"]) <= (set(labels) if labels else {0})
    assert set(batch["data_type"]) == {1 if labels else 0}


def _make(spec, split="train", size=0):
  return sources.make_source(spec, split, size, 0, 32)


# ------------------------------------------------------------------------------- csv


@pytest.fixture
def csv_dir(tmp_path):
  for color in ("red", "green", "blue"):
    _save(str(tmp_path / "imgs" / f"{color}.png"), color)
  with open(tmp_path / "train.tsv", "w") as f:
    f.write("filepath\ttitle\n")
    for color in ("red", "green", "blue"):
      f.write(f"imgs/{color}.png\ta {color} image\n")
  with open(tmp_path / "other.csv", "w") as f:
    f.write('url;caption;extra\n')
    f.write(f'{tmp_path}/imgs/red.png;"a red; image";1\n')  # absolute path, quoted sep
    f.write('imgs/blue.png;blue;2\n')
  return tmp_path


def test_csv_source_defaults(csv_dir, monkeypatch):
  monkeypatch.chdir("/")  # relative paths resolve against the table's folder
  src = _make("csv:" + str(csv_dir / "train.tsv"))
  assert len(src) == 3
  ex = src[1]
  assert isinstance(ex["image"], bytes)  # Encoded: the transform decodes it.
  image = transforms.as_image_u8(ex["image"])
  assert image.shape == (20, 30, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 0], COLORS["green"])
  assert ex["text"] == "a green image"
  assert ex["key"] == str(csv_dir / "imgs" / "green.png")
  assert len(_make("csv:" + str(csv_dir / "train.tsv"), size=2)) == 2


def test_csv_source_query_options(csv_dir):
  spec = "csv:" + str(csv_dir / "other.csv") + "?image_column=url&caption_column=caption&separator=;"
  src = _make(spec)
  assert [src[i]["text"] for i in range(len(src))] == ["a red; image", "blue"]
  np.testing.assert_array_equal(transforms.as_image_u8(src[1]["image"])[3, 3],
                                COLORS["blue"])
  # Factory kwargs work too.
  from vlp_jax.registry import SOURCES  # pylint: disable=g-import-not-at-top
  src = SOURCES.get("csv")(path=str(csv_dir / "other.csv"), image_column="url",
                           caption_column="caption", separator="semicolon")
  assert len(src) == 2


def test_csv_train_dataset(csv_dir, tokenizer):
  _check_train_batches("csv:" + str(csv_dir / "train.tsv"), tokenizer,
                       {"a red image", "a green image", "a blue image"})


def test_csv_errors(csv_dir):
  missing = str(csv_dir / "nope.csv")
  with pytest.raises(FileNotFoundError) as e:
    _make("csv:" + missing)
  assert missing in str(e.value) and "csv:" in str(e.value)
  with pytest.raises(ValueError) as e:
    _make("csv:" + str(csv_dir / "other.csv") + "?separator=;")
  msg = str(e.value)
  assert "'filepath'" in msg and "'title'" in msg and "other.csv" in msg
  assert "image_column=" in msg and "['url', 'caption', 'extra']" in msg
  with pytest.raises(ValueError, match="Unknown option 'colour'"):
    _make("csv:" + str(csv_dir / "train.tsv") + "?colour=red")
  with pytest.raises(ValueError, match="needs a path"):
    _make("csv")


@pytest.mark.parametrize("source,ext", [("jsonl", ".jsonl"), ("csv", ".csv")])
def test_directory_instead_of_a_file_says_so(tmp_path, source, ext):
  # Used to say "file not found" for a folder that exists.
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(errors.DataPathError) as e:
    _make(f"{source}:{empty}")
  msg = str(e.value)
  assert f"'{empty}' is a directory" in msg and "not found" not in msg, msg
  assert f"holds no {ext}" in msg and f"{source}:{empty}/train{ext}" in msg, msg
  assert isinstance(e.value, FileNotFoundError)
  data = tmp_path / "data"
  data.mkdir()
  names = [f"part{i}{ext}" for i in range(7)]
  for name in names + ["notes.txt"]:
    (data / name).write_text("")
  (data / f"sub{ext}").mkdir()  # a folder is not listed
  with pytest.raises(errors.DataPathError) as e:
    _make(f"{source}:{data}")
  msg = str(e.value)
  assert f"'{data}' is a directory" in msg and f"{source}:{data}/part0{ext}" in msg, msg
  for name in names[:5]:
    assert f"'{data / name}'" in msg, msg
  assert "and 2 more" in msg and "notes.txt" not in msg and f"sub{ext}" not in msg, msg


# ----------------------------------------------------------------------- imagefolder


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "train"
  _save(str(root / "red_thing" / "a.png"), "red")
  _save(str(root / "red_thing" / "b.JPG"), "red", fmt="JPEG")
  _save(str(root / "blue_thing" / "sub" / "c.webp"), "blue", fmt="WEBP")
  _save(str(root / "green_thing" / "d.bmp"), "green", fmt="BMP")
  (root / "green_thing" / "notes.txt").write_text("not an image")
  (root / "empty_class").mkdir()
  return root


def test_imagefolder_source(folder):
  src = _make("imagefolder:" + str(folder))
  assert src.class_folders == ["blue_thing", "empty_class", "green_thing", "red_thing"]
  assert src.class_names == ["blue thing", "empty class", "green thing", "red thing"]
  assert len(src) == 4
  examples = [src[i] for i in range(4)]
  assert [e["label"] for e in examples] == [0, 2, 3, 3]
  assert [e["text"] for e in examples] == ["blue thing", "green thing", "red thing",
                                           "red thing"]
  for e, color in zip(examples, ["blue", "green", "red", "red"]):
    image = transforms.as_image_u8(e["image"])
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - COLORS[color]).max() < 10  # JPEG / WEBP
  assert src.root == str(folder)  # Where the zero-shot evaluator looks for templates.txt.
  # `size` keeps an evenly spaced subset (first and last image).
  sub = _make("imagefolder:" + str(folder), size=2)
  assert [sub[i]["label"] for i in range(2)] == [0, 3]


def test_imagefolder_split_placeholder_and_classnames_files(folder):
  src = _make("imagefolder:" + str(folder.parent / "{split}"), split="train")
  assert len(src) == 4
  (folder / "classnames.txt").write_text("sky\nvoid\ngrass\nfire\n")
  assert _make("imagefolder:" + str(folder)).class_names == ["sky", "void", "grass", "fire"]
  (folder / "classnames.txt").write_text("sky\nvoid\n")
  with pytest.raises(ValueError, match="2 names for 4 class folders"):
    _make("imagefolder:" + str(folder))
  os.remove(folder / "classnames.txt")
  (folder / "classnames.json").write_text(
      '{"blue_thing": "sky", "empty_class": "void", "green_thing": "grass", '
      '"red_thing": "fire"}')
  src = _make("imagefolder:" + str(folder))
  assert src.class_names == ["sky", "void", "grass", "fire"] and src[0]["text"] == "sky"


def test_imagefolder_train_dataset(folder, tokenizer):
  # A classification source: its classes become prompt captions, labels 1 + class.
  _check_train_batches("imagefolder:" + str(folder), tokenizer,
                       {"a blue thing.", "a green thing.", "a red thing."},
                       labels={1, 3, 4}, class_templates="a {}.")


def test_imagefolder_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError) as e:
    _make("imagefolder:" + missing)
  assert missing in str(e.value) and "one sub-folder per class" in str(e.value)
  (tmp_path / "flat").mkdir()
  _save(str(tmp_path / "flat" / "a.png"), "red")
  with pytest.raises(ValueError, match="no class sub-folders") as e:
    _make("imagefolder:" + str(tmp_path / "flat"))
  assert str(tmp_path / "flat") in str(e.value)
  (tmp_path / "noimg" / "cat").mkdir(parents=True)
  (tmp_path / "noimg" / "cat" / "x.txt").write_text("")
  with pytest.raises(ValueError, match="no images") as e:
    _make("imagefolder:" + str(tmp_path / "noimg"))
  assert str(tmp_path / "noimg") in str(e.value)


# ----------------------------------------------------------------------- arrayrecord


def _encoded(color, fmt="PNG", size=(20, 30)):
  buf = io.BytesIO()
  Image.fromarray(np.full(size + (3,), COLORS[color], np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
  records = [
      sources_arrayrecord.encode_record(_encoded("red"), "a red image", label=np.int64(0)),
      sources_arrayrecord.encode_record(_encoded("green", "JPEG"), ["a green image", "green"],
                                        label=1),
      sources_arrayrecord.encode_record(_encoded("blue"), "a blue image", label=2,
                                        key="blue-0"),
      sources_arrayrecord.encode_record(_encoded("white"), "a white image", label=3),
      sources_arrayrecord.encode_record(_encoded("red"), "red again", label=0),
  ]
  paths = sources_arrayrecord.write_shards(iter(records), str(tmp_path / "train.ar"), 2)
  assert paths == [str(tmp_path / "train.ar-00000-of-00002"),
                   str(tmp_path / "train.ar-00001-of-00002")]
  return tmp_path


def test_record_roundtrip():
  data = sources_arrayrecord.encode_record(b"\x89PNG..", ("a", "b"), label=np.int32(7),
                                           score=np.float32(0.5))
  rec = sources_arrayrecord.decode_record(data)
  assert rec == {"image": b"\x89PNG..", "text": ["a", "b"], "label": 7, "score": 0.5}
  # The JSON fallback (no msgpack) decodes too.
  json_rec = b'{"image": "aGk=", "text": "x"}'
  assert sources_arrayrecord.decode_record(json_rec) == {"image": b"hi", "text": "x"}
  assert sources_arrayrecord.shard_paths("/d/t-{shard:02d}-of-{num_shards:02d}", 2) == [
      "/d/t-00-of-02", "/d/t-01-of-02"]


def test_arrayrecord_source(shards):
  src = _make("arrayrecord:" + str(shards / "train.ar-*"))
  assert len(src) == 5
  # Round robin: shard 0 holds records 0, 2, 4 and shard 1 holds 1, 3.
  texts = [src[i]["text"] for i in range(5)]
  assert texts == ["a red image", "a blue image", "red again",
                   ["a green image", "green"], "a white image"]
  assert [src[i]["label"] for i in range(5)] == [0, 2, 0, 1, 3]
  for i, color in enumerate(["red", "blue", "red", "green", "white"]):
    image = transforms.as_image_u8(src[i]["image"])
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - COLORS[color]).max() < 10
  assert src[1]["key"] == "blue-0" and src[0]["key"].endswith("[0]")
  assert len(_make("arrayrecord:" + str(shards / "train.ar-*"), size=3)) == 3
  with pytest.raises(IndexError):
    src[5]  # pylint: disable=pointless-statement
  # Picklable (multiprocessing workers).
  clone = pickle.loads(pickle.dumps(src))
  assert clone[3]["text"] == texts[3]


def test_arrayrecord_train_dataset(shards, tokenizer):
  _check_train_batches("arrayrecord:" + str(shards / "train.ar-*"), tokenizer,
                       {"a red image", "a green image", "green", "a blue image",
                        "a white image", "red again"})


def test_arrayrecord_errors(tmp_path):
  pattern = str(tmp_path / "nothing-*.arrayrecord")
  with pytest.raises(FileNotFoundError) as e:
    _make("arrayrecord:" + pattern)
  assert pattern in str(e.value) and "No ArrayRecord files match" in str(e.value)
  pattern = str(tmp_path / "nodir" / "x-*")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _make("arrayrecord:" + pattern)
  # Records without a 'text' field.
  import msgpack  # pylint: disable=g-import-not-at-top
  sources_arrayrecord.write_shards([msgpack.packb({"image": b"x", "caption": "c"})],
                                   str(tmp_path / "bad.ar"), 1)
  with pytest.raises(ValueError) as e:
    _make("arrayrecord:" + str(tmp_path / "bad.ar*"))
  assert "['text']" in str(e.value) and "bad.ar" in str(e.value)
  assert "['caption', 'image']" in str(e.value)


# ------------------------------------------------------------------------------ tfds


def test_tfds_parse_arg():
  assert sources_tfds.parse_arg("cifar10:test", "train") == ("cifar10", "test", {})
  assert sources_tfds.parse_arg("cifar10", "validation") == ("cifar10", "validation", {})
  assert sources_tfds.parse_arg("eurosat/rgb:train[:80%]?data_dir=/d", "x") == (
      "eurosat/rgb", "train[:80%]", {"data_dir": "/d"})
  with pytest.raises(ValueError, match="needs a dataset"):
    sources_tfds.parse_arg("", "train")


def test_tfds_label_dataset(tfds_mock):
  src = _make("tfds:cifar10:test", size=6)
  assert len(src) == 6
  assert src.class_names == [str(i) for i in range(10)]  # mock metadata names
  ex = src[0]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  assert 0 <= ex["label"] < 10 and ex["text"] == src.class_names[ex["label"]]
  assert ex["key"] == "cifar10/test/0"


def test_tfds_classnames_option(tfds_mock, tmp_path):
  names = tmp_path / "names.txt"
  names.write_text("\n".join(f"thing_{i}" for i in range(10)))
  src = _make(f"tfds:cifar10:test?classnames={names}")
  assert src.class_names[3] == "thing 3" and src[0]["text"].startswith("thing ")
  names.write_text("a\nb\n")
  with pytest.raises(ValueError, match="2 class names"):
    _make(f"tfds:cifar10:test?classnames={names}")


def test_tfds_train_dataset(tfds_mock, tokenizer):
  _check_train_batches("tfds:cifar10", tokenizer, {f"the {i}." for i in range(10)},
                       labels=set(range(1, 11)), class_templates="the {}.")


def test_tfds_errors(tfds_mock):
  with pytest.raises(ValueError) as e:
    _make("tfds:cifar10:test?text_key=caption")
  msg = str(e.value)
  assert "'caption'" in msg and "text_key=" in msg and "'label'" in msg


def test_tfds_missing_dataset(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(ValueError) as e:
    _make("tfds:cifar10:test")
  msg = str(e.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg and "tfds build cifar10" in msg
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    _make("tfds:no_such_dataset_xyz:test")


@pytest.fixture
def tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    yield
