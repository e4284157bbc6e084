"""Tests for the `shapes:hard` benchmark variant and the shapes classification views."""
import numpy as np
import pytest

from vlp_jax import errors
from vlp_jax.data import shapes, sources, templates, tokenizers
from vlp_jax.registry import SOURCES


def _hard(split, size=64, **kw):
  return sources.make_source("shapes:hard", split, size, kw.pop("seed", 0), 64)


def _pair(ex):
  return tuple(shapes.HARD_CLASS_NAMES[ex["label"]].split(" "))


def test_spec_parsing_and_errors():
  easy = sources.make_source("shapes", "train", 4, 0, 64)
  assert isinstance(easy, shapes.ShapesSource)
  assert isinstance(_hard("train"), shapes.HardShapesSource)
  cls = sources.make_source("shapes:hard,classes", "test", 4, 0, 64)
  assert cls.classification and sources.is_classification(cls)
  plus = sources.make_source("shapes:hard+classes", "test", 4, 0, 64)
  np.testing.assert_array_equal(plus[1]["image"], cls[1]["image"])
  assert plus[1]["text"] == cls[1]["text"] and plus.classification
  assert not sources.is_classification(_hard("test"))
  easy_cls = sources.make_source("shapes:classes", "train", 4, 0, 64)
  assert sources.is_classification(easy_cls)
  for bad in ("shapes:hrad", "shapes:hard,hard", "shapes:classes,x"):
    with pytest.raises(errors.ConfigError, match="shapes:hard,classes"):
      sources.make_source(bad, "train", 4, 0, 64)
  with pytest.raises(errors.ConfigError, match="heldout"):
    _hard("val")
  with pytest.raises(errors.ConfigError, match="no class labels"):
    sources.make_source("shapes:hard,classes", "relations", 4, 0, 64)
  with pytest.raises(errors.ConfigError, match="image_size >= 32"):
    sources.make_source("shapes:hard", "train", 4, 0, 16)


def test_deterministic_and_seed_split_dependent():
  a, b = _hard("train", seed=3), _hard("train", seed=3)
  for i in (0, 7, 63):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["text"] == b[i]["text"] and a[i]["label"] == b[i]["label"]
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  assert not np.array_equal(a[0]["image"], _hard("train", seed=4)[0]["image"])
  assert not np.array_equal(_hard("validation")[0]["image"], _hard("test")[0]["image"])
  ex = a[5]
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
  assert ex["key"] == "shapes_hard/train/5" and 3 <= len(ex["text"]) <= 5


def test_eval_labels_consistent_with_captions_and_held_out_pairs():
  val, test, held = _hard("validation", 100), _hard("test", 240), _hard("heldout", 24)
  assert len(shapes.HARD_CLASS_NAMES) == 64 == len(val.class_names)
  assert len(shapes.HELD_OUT) == 8
  assert {c for c, _ in shapes.HELD_OUT} == set(shapes.HARD_COLOR_NAMES)
  assert {s for _, s in shapes.HELD_OUT} == set(shapes.HARD_SHAPES)
  test_held = 0
  for src, n in ((val, 100), (test, 240), (held, 24)):
    for i in range(n):
      ex = src[i]
      color, shape = _pair(ex)
      assert ex["label"] == (shapes.HARD_COLOR_NAMES.index(color) * 8
                             + shapes.HARD_SHAPES.index(shape))
      assert ex["keywords"] == [color, shape]
      for caption in ex["text"]:
        words = caption.rstrip(".").split()
        assert color in words and shape in words, caption
      in_held_out = (color, shape) in shapes.HELD_OUT
      assert in_held_out == (src is held) or src is test
      test_held += in_held_out and src is test
  assert 12 <= test_held <= 50  # 1 in 8 of the test split.


def test_train_excludes_held_out_pairs_and_mixes_object_counts():
  src = _hard("train", 160)
  counts = {1: 0, 2: 0, 3: 0}
  held_words = [f"{c} {s}" for c, s in shapes.HELD_OUT]
  for i in range(160):
    ex = src[i]
    n = max(1, len(ex["keywords"]) // 2) if ex["label"] < 0 else 1
    counts[min(n, 3)] += 1
    if ex["label"] >= 0:
      assert _pair(ex) not in shapes.HELD_OUT
    for caption in ex["text"]:
      assert not any(w in caption for w in held_words), caption
  assert counts[1] > 40 and counts[2] + counts[3] > 60


def _named_pairs(texts):
  """The "<colour> <shape>" phrases of captions."""
  return {name for name in shapes.HARD_CLASS_NAMES for t in texts if name in t}


def test_relations_twins_swap_colours():
  src = _hard("relations", 40)
  for k in range(0, 40, 2):
    a, b = src[k], src[k + 1]
    assert a["label"] == b["label"] == -1
    pa, pb = _named_pairs(a["text"]), _named_pairs(b["text"])
    assert len(pa) == len(pb) == 2 and not pa & pb, (a["text"], b["text"])
    words = lambda pairs: sorted(w for p in pairs for w in p.split())
    assert words(pa) == words(pb)  # Same colours and shapes, bound the other way.
    assert not any(tuple(p.split()) in shapes.HELD_OUT for p in pa | pb)
    assert not np.array_equal(a["image"], b["image"])


def test_vocabulary_covers_captions_and_prompts():
  tok = tokenizers.get_tokenizer("words:shapes_hard")
  assert set(shapes.vocabulary()) <= set(shapes.hard_vocabulary())
  assert tok.vocab_size <= 64  # configs/bench.py: model.text.vocab_size.
  longest = 0
  for split in shapes.HARD_SPLIT_IDS:
    src = _hard(split, 40)
    for i in range(40):
      for caption in src[i]["text"]:
        ids = tok.encode(caption)
        assert tok.unk_id not in ids, caption
        longest = max(longest, len(ids))
  assert longest + 2 <= 20  # BOS + EOS within configs/bench.py's context_length.
  prompts = templates.resolve((), "shapes:hard", _hard("test"), "t")
  assert prompts.templates == templates.SHAPES
  for name in shapes.HARD_CLASS_NAMES:
    for p in prompts.prompts(name):
      assert tok.unk_id not in tok.encode(p), p
  # The easy data still tokenizes with the union vocabulary.
  easy = shapes.ShapesSource("train", size=20)
  assert all(tok.unk_id not in tok.encode(t)
             for i in range(20) for t in easy[i]["text"])


def test_classification_views():
  for spec, names in (("shapes:hard,classes", shapes.HARD_CLASS_NAMES),
                      ("shapes:classes", shapes.CLASS_NAMES)):
    train = sources.make_source(spec, "train", 30, 0, 64)
    assert train.class_names == names
    for i in range(30):
      ex = train[i]
      assert 0 <= ex["label"] < len(names) and ex["text"] == names[ex["label"]]
    caption_view = sources.make_source(spec.replace(",classes", "").replace(
        ":classes", ""), "train", 30, 0, 64)
    # Another index stream in train, the same images in evaluation splits.
    assert not any(np.array_equal(train[i]["image"], caption_view[i]["image"])
                   for i in range(10))
    test = sources.make_source(spec, "test", 10, 0, 64)
    test_captions = sources.make_source(spec.replace(",classes", "").replace(
        ":classes", ""), "test", 10, 0, 64)
    for i in range(10):
      np.testing.assert_array_equal(test[i]["image"], test_captions[i]["image"])
      assert test[i]["label"] == test_captions[i]["label"]
  hard_train = sources.make_source("shapes:hard,classes", "train", 100, 0, 64)
  assert all(_pair(hard_train[i]) not in shapes.HELD_OUT for i in range(100))


def test_colour_present_in_single_object_images():
  """The labelled colour, up to the lighting factor (0.85-1.1), jitter and noise,
  matches more pixels than any other colour (the clutter is grey)."""
  src = _hard("test", 60)
  palette = np.asarray([shapes.HARD_COLORS[c] for c in shapes.HARD_COLOR_NAMES],
                       np.float32)
  lights = np.linspace(0.85, 1.1, 6, dtype=np.float32)
  for i in range(60):
    ex = src[i]
    img = ex["image"].reshape(-1, 3).astype(np.float32)
    img = img[img.max(1) - img.min(1) > 40][:, None, None]  # Coloured pixels only.
    dist = np.abs(img - lights[:, None, None] * palette).max(-1).min(1)  # [N, colours]
    votes = (dist <= 30).sum(0)
    color = _pair(ex)[0]
    where = (i, ex["text"][0], votes)
    assert votes[shapes.HARD_COLOR_NAMES.index(color)] >= 8, where
    assert shapes.HARD_COLOR_NAMES[int(votes.argmax())] == color, where


def test_registry_factory_path_argument():
  make = SOURCES.get("shapes")
  assert isinstance(make(split="test", size=2, path="hard", batch_size=8),
                    shapes.HardShapesSource)
  assert isinstance(make(split="test", size=2), shapes.ShapesSource)


def test_bench_config_validates():
  from vlp_jax import cli, validation  # pylint: disable=g-import-not-at-top
  config = cli.load_config_file("configs/bench.py")
  validation.validate(config)
  assert config.data.source == "shapes:hard" and config.batch_size == 128
  tok = tokenizers.get_tokenizer(config.data.tokenizer)
  assert tok.vocab_size <= config.model.text.vocab_size
  assert {e.split for e in config.evals.values()} == {"test", "heldout", "relations"}
