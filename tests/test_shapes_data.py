"""Tests for the procedurally generated shapes dataset."""
import numpy as np
import pytest

from vlp_jax.data import shapes, tokenizers
from vlp_jax.registry import SOURCES


def _color_pixels(image, rgb, tol=40):
  diff = np.abs(image.astype(np.int32) - np.asarray(rgb, np.int32)).max(-1)
  return int((diff <= tol).sum())


def test_example_structure():
  src = shapes.ShapesSource("train", size=10, image_size=64)
  ex = src[3]
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
  assert 3 <= len(ex["text"]) <= 5
  assert len(set(ex["text"])) == len(ex["text"])
  assert all(t == t.lower() for t in ex["text"])
  assert ex["key"] == "shapes/train/3"
  assert isinstance(ex["label"], int)


def test_deterministic_and_index_dependent():
  a = shapes.ShapesSource("train", size=100, seed=7)
  b = shapes.ShapesSource("train", size=100, seed=7)
  for i in (0, 5, 99):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["text"] == b[i]["text"]
    assert a[i]["label"] == b[i]["label"]
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  other_seed = shapes.ShapesSource("train", size=100, seed=8)
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])


def test_train_and_validation_streams_differ():
  # max_shapes=1 makes train draw exactly like validation, so only the split differs.
  train = shapes.ShapesSource("train", size=20, max_shapes=1)
  val = shapes.ShapesSource("validation", size=20)
  for i in range(20):
    assert not np.array_equal(train[i]["image"], val[i]["image"])
  assert [train[i]["label"] for i in range(20)] != [val[i]["label"] for i in range(20)]


def test_validation_one_shape_with_consistent_label():
  src = shapes.ShapesSource("validation", size=200)
  seen = set()
  for i in range(200):
    ex = src[i]
    assert 0 <= ex["label"] < len(shapes.CLASS_NAMES) == 24
    color, shape = shapes.CLASS_NAMES[ex["label"]].split(" ")
    assert shapes.COLOR_NAMES.index(color) * len(shapes.SHAPES) + shapes.SHAPES.index(
        shape) == ex["label"]
    assert ex["keywords"] == [color, shape]
    for caption in ex["text"]:
      words = caption.rstrip(".").split()
      assert color in words and shape in words, caption
    assert any(any(p in c for p in shapes.POSITIONS) for c in ex["text"])
    assert any(any(s in c.split() for s in shapes.SIZES) for c in ex["text"])
    seen.add(ex["label"])
  assert len(seen) >= 20  # Classes are roughly balanced.


def test_shape_colour_present_in_image():
  src = shapes.ShapesSource("validation", size=50)
  for i in range(50):
    ex = src[i]
    color = ex["keywords"][0]
    rgb = shapes.COLORS[color]
    assert _color_pixels(ex["image"], rgb) >= 20, (i, ex["text"][0])
    others = [c for c in shapes.COLOR_NAMES if c != color]
    assert all(_color_pixels(ex["image"], shapes.COLORS[c], tol=25) < 10
               for c in others), (i, ex["text"][0])


def test_large_shapes_cover_more_pixels_than_small():
  src = shapes.ShapesSource("validation", size=300)
  area = {"small": [], "large": []}
  for i in range(300):
    ex = src[i]
    size = "large" if any("large" in t.split() for t in ex["text"]) else None
    size = size or ("small" if any("small" in t.split() for t in ex["text"]) else None)
    if size:
      area[size].append(_color_pixels(ex["image"], shapes.COLORS[ex["keywords"][0]]))
  assert area["small"] and area["large"]
  assert max(area["small"]) < min(area["large"])


def test_train_has_two_shape_examples():
  src = shapes.ShapesSource("train", size=200)
  two = [src[i] for i in range(200) if src[i]["label"] == -1]
  assert 20 <= len(two) <= 100  # About 30%.
  for ex in two:
    caption = ex["text"][0]
    assert " and " in caption
    assert all(k in caption for k in ex["keywords"])
    present = [c for c in shapes.COLOR_NAMES if c in ex["keywords"]]
    for c in present:
      assert _color_pixels(ex["image"], shapes.COLORS[c]) >= 20
  single = shapes.ShapesSource("train", size=200, max_shapes=1)
  assert all(single[i]["label"] >= 0 for i in range(100))


def test_index_errors_and_len():
  src = shapes.ShapesSource("validation", size=5)
  assert len(src) == 5
  for bad in (-1, 5, 100):
    with pytest.raises(IndexError):
      src[bad]
  assert len(shapes.ShapesSource("train")) >= 100_000
  with pytest.raises(ValueError):
    shapes.ShapesSource("nope")


def test_registry_factory_and_image_size():
  src = SOURCES.get("shapes")(split="validation", size=3, seed=1, image_size=32,
                              batch_size=8, unrelated="x")
  assert isinstance(src, shapes.ShapesSource)
  assert len(src) == 3 and src[0]["image"].shape == (32, 32, 3)


def test_zero_shot_prompts_fit_the_word_vocabulary():
  """The zero-shot evaluator's 'shapes' templates fix "a"/"an" and use only words of
  the `words:shapes` vocabulary."""
  from vlp_jax.evaluators import templates  # pylint: disable=g-import-not-at-top
  shapes_set = templates.resolve("shapes", "shapes", None, "templates")
  prompts = shapes_set.prompts("orange cross")
  assert "a photo of an orange cross." in prompts and len(prompts) >= 5
  assert all("orange cross" in p for p in prompts)
  tok = tokenizers.get_tokenizer("words:shapes")
  for name in shapes.CLASS_NAMES:
    for p in shapes_set.prompts(name):
      assert tok.unk_id not in tok.encode(p), p
