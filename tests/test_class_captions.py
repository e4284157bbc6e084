"""Classification + caption training data: batch 'label' / 'data_type' / 'image_id',
label offsets across mixture components, class prompts from config.data.class_templates."""
import os

import numpy as np
import pytest

from tests import datagen
from vlp_jax import cli, errors
from vlp_jax.data import mixture, pipeline, sources, templates, tokenizers, transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizers.get_tokenizer("bytes")


def write_imagefolder(root, classes, per_class=2, seed=0):
  """root/<class>/<i>.jpg for each class; returns the folder."""
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      with open(os.path.join(root, name, f"{i}.jpg"), "wb") as f:
        f.write(datagen.jpeg(seed + 100 * c + i))
  return str(root)


def small_config(batch_size=8, **data):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.batch_size = batch_size
  c.data.update(source="shapes", image_size=16, tokenizer="bytes", size=32)
  c.data.update(data)
  c.model.text.context_length = 48  # Whole prompts, so they decode exactly.
  return c


def take(config, n):
  it = iter(pipeline.train_dataset(config, TOKENIZER))
  return [pipeline.split_bad_counts(next(it))[0] for _ in range(n)]


def ids_of(root):
  """image_id -> file path of every image in an imagefolder."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".jpg"):
        path = os.path.join(dirpath, name)
        out[transforms.example_id(path)] = path
  return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("cls")
  a = write_imagefolder(str(root / "a"), ["cat", "dog"])
  with open(os.path.join(a, "templates.txt"), "w") as f:
    f.write("# mine\na drawing of a {}.\nthe {}, seen from above\n")
  b = write_imagefolder(str(root / "b"), ["ant", "bee", "owl"], seed=50)
  return a, b


def test_example_id_is_a_stable_31_bit_hash():
  ids = [transforms.example_id(k) for k in ("a", "shapes/train/0", b"a", 7)]
  # Fixed values: the same in every process and run (Python's hash() is salted).
  assert ids[:2] == [transforms.example_id("a"), transforms.example_id("shapes/train/0")]
  assert ids[0] == ids[2] and ids[3] == transforms.example_id("7")
  assert ids[0] == 1431053258 and ids[1] == 133357113
  many = {transforms.example_id(f"shapes/train/{i}") for i in range(20000)}
  assert all(0 <= i < 2**31 for i in many) and len(many) >= 19990


def test_mixture_of_captions_and_classes_labels_each_row(folders):
  a, _ = folders
  config = small_config(mixture=(("shapes", 0.5), (f"imagefolder:{a}", 0.5)))
  shapes_ids = {transforms.example_id(f"shapes/train/{i}") for i in range(32)}
  folder_ids = ids_of(a)
  prompts = {t.format(n): 1 + c for c, n in enumerate(["cat", "dog"])
             for t in ("a drawing of a {}.", "the {}, seen from above")}
  seen = set()
  for batch in take(config, 3):
    assert set(batch) == {"image", "text", "label", "data_type", "image_id"}
    for key in ("label", "data_type", "image_id"):
      assert batch[key].shape == (8,) and batch[key].dtype == np.int32
    for text, label, kind, image_id in zip(batch["text"], batch["label"],
                                           batch["data_type"], batch["image_id"]):
      caption = TOKENIZER.decode(text)
      if kind == 0:  # shapes: caption data even though its examples carry a 'label'.
        assert label == 0 and image_id in shapes_ids and caption not in prompts
      else:  # The folder's templates.txt ('auto'), filled with the row's class.
        assert kind == 1 and image_id in folder_ids
        assert prompts[caption] == label
        class_folder = os.path.basename(os.path.dirname(folder_ids[image_id]))
        assert label == 1 + ["cat", "dog"].index(class_folder)
        seen.add(caption)
  assert len(seen) >= 3  # The template is drawn per example.


def test_two_classification_components_get_disjoint_labels(folders):
  a, b = folders
  config = small_config(batch_size=12, mixture=(
      ("shapes", 0.2), (f"imagefolder:{a}", 0.4), (f"imagefolder:{b}", 0.4)))
  a_ids, b_ids = ids_of(a), ids_of(b)
  by_source = {"a": set(), "b": set(), "shapes": set()}
  for batch in take(config, 2):
    for text, label, image_id in zip(batch["text"], batch["label"], batch["image_id"]):
      caption = TOKENIZER.decode(text)
      if image_id in a_ids:
        by_source["a"].add(int(label))
      elif image_id in b_ids:  # No templates.txt: the default ('imagenet') set.
        by_source["b"].add(int(label))
        name = ["ant", "bee", "owl"][label - 3]
        assert caption in [t.format(name) for t in templates.IMAGENET]
      else:
        by_source["shapes"].add(int(label))
  assert by_source["a"] <= {1, 2} and by_source["b"] <= {3, 4, 5}
  assert by_source["a"] and len(by_source["b"]) >= 2 and by_source["shapes"] == {0}


def test_class_templates_option_names_the_prompts(folders):
  a, _ = folders
  config = small_config(source=f"imagefolder:{a}", class_templates="shapes", size=0)
  shapes_set = templates.Templates(templates.SHAPES, "", True)
  allowed = {p for n in ("cat", "dog") for p in shapes_set.prompts(n)}
  batch = take(config, 1)[0]
  assert {TOKENIZER.decode(t) for t in batch["text"]} <= allowed
  assert set(batch["data_type"]) == {1} and set(batch["label"]) <= {1, 2}


def test_transform_turns_a_label_into_a_prompt():
  found = templates.Templates(("a {}.", "one {}", "the {} here"), "test")
  transform = transforms.TrainTransform(TOKENIZER, 16, 32, class_names=("red", "blue"),
                                        class_templates=found, label_offset=5)
  element = {"image": np.zeros((20, 20, 3), np.uint8), "text": "ignored", "label": 1,
             "key": "k1"}
  texts = set()
  for seed in range(12):
    out = transform.random_map(element, np.random.default_rng(seed))
    assert (out["label"], out["data_type"]) == (7, 1)  # 1 + 5 + class 1
    assert out["image_id"] == transforms.example_id("k1")
    texts.add(TOKENIZER.decode(out["text"]))
  assert texts == {"a blue.", "one blue", "the blue here"}
  with pytest.raises(ValueError, match="label 2 is not a class index in 0...1"):
    transform.random_map(dict(element, label=2), np.random.default_rng(0))
  with pytest.raises(ValueError, match="no 'key'"):
    transform.random_map({"image": element["image"], "text": "x"},
                         np.random.default_rng(0))


def test_which_sources_are_classification(folders):
  a, _ = folders
  assert sources.is_classification(sources.make_source(f"imagefolder:{a}", "train", 0,
                                                       0, 16))
  shapes_source = sources.make_source("shapes", "train", 4, 0, 16)
  assert hasattr(shapes_source, "class_names")  # For zero-shot evaluation ...
  assert not sources.is_classification(shapes_source)  # ... but caption data.


@pytest.mark.parametrize("value,error,pattern", [
    ("imagenett", errors.ConfigError, r"config\.data\.class_templates='imagenett'.*"
     r"Did you mean 'imagenet'"),
    ("autoo", errors.ConfigError, "Did you mean 'auto'"),
    ("/nonexistent/t.txt", errors.DataPathError, r"class_templates.*not found"),
    ("a {} and {}", errors.ConfigError, r"class_templates.*2 fields"),
])
def test_bad_class_templates_fail_early(value, error, pattern):
  config = small_config(class_templates=value)
  with pytest.raises(error, match=pattern):
    mixture.check_config(config)
  with pytest.raises(error, match=pattern):  # Before any source is read.
    pipeline.train_dataset(config, TOKENIZER)
  for good in ("auto", "imagenet", "shapes", "a photo of a {}."):
    mixture.check_config(small_config(class_templates=good))


def test_broken_templates_txt_names_the_file(tmp_path):
  root = write_imagefolder(str(tmp_path / "f"), ["cat"], per_class=1)
  with open(os.path.join(root, "templates.txt"), "w") as f:
    f.write("a {}.\nno class here\n")
  config = small_config(source=f"imagefolder:{root}", size=0)
  with pytest.raises(errors.DataError, match=r"class_templates.*templates\.txt.*"
                     r"'no class here'"):
    pipeline.train_dataset(config, TOKENIZER)
