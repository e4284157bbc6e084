"""The `index:` source (a curated subset of another source) and caption noise."""
import json
import os

import numpy as np
import pytest

from tests import test_data_scale
from vlp_jax import errors
from vlp_jax.data import sources, sources_index, transforms

SPEC = "shapes"
N = 40
PICK = [3, 17, 0, 39, 8, 21, 5, 30, 12, 11, 26, 34]


def write(tmp_path, indices=PICK, spec=SPEC, n=N, seed=0, name="index.json",
          split="train"):
  return sources_index.write_index(str(tmp_path / name), indices, spec, split, n, seed,
                                   overwrite=True)


def test_index_source_yields_exactly_the_listed_records(tmp_path):
  path = write(tmp_path)
  src = sources.make_source("index:" + path, "train", 0, 0, 32)
  base = sources.make_source(SPEC, "train", N, 0, 32)
  assert len(src) == len(PICK)
  for i, j in enumerate(PICK):
    got, want = src[i], base[j]
    assert got["key"] == want["key"] == f"shapes/train/{j}"
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["text"] == want["text"]
  with pytest.raises(IndexError):
    src[len(PICK)]  # pylint: disable=pointless-statement
  assert src.class_names == base.class_names  # Attributes of the wrapped source.
  # config.data.size keeps the first entries; the header's seed fixes the records
  # whatever seed the caller passes.
  assert [e["key"] for e in (sources.make_source("index:" + path, "train", 3, 5, 32)[i]
                             for i in range(3))] == [f"shapes/train/{j}" for j in PICK[:3]]


def test_other_splits_read_the_wrapped_source_unfiltered(tmp_path):
  src = sources.make_source("index:" + write(tmp_path), "validation", 10, 0, 32)
  assert len(src) == 10 and src[4]["key"] == "shapes/validation/4"


@pytest.mark.parametrize("problem, error, match", [
    ("missing", errors.DataPathError, "Index file not found"),
    ("not_json", errors.DataError, "not valid JSON"),
    ("wrong_format", errors.DataError, "not a vlp_jax index file"),
    ("no_npy", errors.DataError, "Cannot read the indices"),
    ("count", errors.DataError, "do not belong together"),
    ("out_of_range", errors.DataError, "selects record 40, but its source holds 40"),
    ("negative", errors.DataError, "selects record -1"),
    ("size_changed", errors.DataError, "written for 50 records"),
    ("float", errors.DataError, "1-D integer array"),
    ("checksum", errors.DataError, "does not match the checksum"),
    ("other_split", errors.DataError, "selects records of split 'validation'"),
    ("exists", errors.ConfigError, "exists .*--overwrite"),
])
def test_bad_index_files_are_clear_errors(tmp_path, problem, error, match):
  path = write(tmp_path)
  npy = str(tmp_path / "index.npy")
  with open(path) as f:
    header = json.load(f)
  if problem == "missing":
    path = str(tmp_path / "nope.json")
  elif problem == "not_json":
    with open(path, "w") as f:
      f.write("{not json")
  elif problem == "wrong_format":
    with open(path, "w") as f:
      json.dump(dict(header, format="other"), f)
  elif problem == "no_npy":
    os.remove(npy)
  elif problem == "count":
    with open(path, "w") as f:
      json.dump(dict(header, count=3), f)
  elif problem == "out_of_range":
    path = write(tmp_path, PICK + [N])
  elif problem == "negative":
    path = write(tmp_path, [-1, 2])
  elif problem == "size_changed":
    path = write(tmp_path, n=50, spec="jsonl:" + _jsonl(tmp_path, 20))
  elif problem == "float":
    np.save(npy, np.asarray(PICK, np.float32))
  elif problem == "checksum":
    np.save(npy, np.asarray(PICK[::-1], np.int64))
  elif problem == "other_split":
    path = write(tmp_path, split="validation")
  elif problem == "exists":  # Writing over an index a run may train on.
    with pytest.raises(error, match=match):
      sources_index.write_index(path, PICK, SPEC, "train", N, 0)
    return
  with pytest.raises(error, match=match):
    sources.make_source("index:" + path, "train", 0, 0, 32)


def _jsonl(tmp_path, n):
  from tests import datagen  # pylint: disable=g-import-not-at-top
  return datagen.write_jsonl(str(tmp_path / "j"), n, "j")


def _config(path, **kw):
  return test_data_scale.small_config("index:" + path, **kw)


def test_index_source_trains_and_resumes_exactly(tmp_path):
  path = write(tmp_path)
  config = _config(path)
  ref, _ = test_data_scale.take(config, 6)
  # Every row is a listed record (a batch's image_id hashes the record's key).
  allowed = {int(transforms.example_id(f"shapes/train/{j}")) for j in PICK}
  ids = {int(i) for b in ref for i in b["image_id"]}
  assert ids <= allowed and len(ids) == len(PICK)  # 6 batches of 4: 2 epochs.
  first, state = test_data_scale.take(config, 3)
  json.dumps(state)
  rest, _ = test_data_scale.take(config, 3, state)
  test_data_scale.assert_same(first + rest, ref)


@pytest.mark.slow
def test_index_source_batches_do_not_depend_on_the_worker_count(tmp_path):
  config = _config(write(tmp_path))
  ref, _ = test_data_scale.take(config, 4)
  config.data.worker_count = 2
  got, _ = test_data_scale.take(config, 4)
  test_data_scale.assert_same(got, ref)


# ----------------------------------------------------------------- caption noise


def test_noisy_captions_shuffle_a_fixed_fraction():
  clean = sources.make_source("shapes:hard", "train", 50, 0, 32)
  noisy = sources.make_source("shapes:hard+noisy=0.3", "train", 50, 0, 32)
  again = sources.make_source("shapes:hard,noisy=0.3", "train", 50, 0, 32)
  assert noisy.corrupted.sum() == 15
  np.testing.assert_array_equal(noisy.caption_donor, again.caption_donor)
  donors = noisy.caption_donor[noisy.corrupted]
  assert sorted(donors) == sorted(np.nonzero(noisy.corrupted)[0])  # A shuffle.
  assert np.all(donors != np.nonzero(noisy.corrupted)[0])
  for i in range(50):
    a, b = noisy[i], clean[i]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"] and a["key"] == b["key"]
    d = noisy.caption_donor[i]
    assert a["text"] == (clean[d]["text"] if d >= 0 else b["text"])
  other = sources.make_source("shapes:hard+noisy=0.3", "train", 50, 1, 32)
  assert not np.array_equal(other.corrupted, noisy.corrupted)  # Seeded.
  assert sources.make_source("shapes:noisy=0", "train", 10, 0, 32).corrupted.sum() == 0


@pytest.mark.parametrize("split", ["test", "heldout", "relations", "validation"])
def test_caption_noise_leaves_evaluation_splits_clean(tmp_path, split):
  clean = sources.make_source("shapes:hard", split, 12, 0, 32)
  noisy = sources.make_source("shapes:hard+noisy=0.5", split, 12, 0, 32)
  path = sources_index.write_index(str(tmp_path / "index.json"), [1, 3],
                                   "shapes:hard+noisy=0.5", "train", 12, 0)
  via_index = sources.make_source("index:" + path, split, 12, 0, 32)
  for src in (noisy, via_index):
    assert not hasattr(src, "corrupted") and len(src) == len(clean)
    for i in range(len(clean)):
      a, b = src[i], clean[i]
      assert a["text"] == b["text"] and a["key"] == b["key"]
      np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("spec, match", [
    ("shapes:hard,noisy=1.5", "noisy=F' with F in"),
    ("shapes:hard,noisy=x", "noisy=F' with F in"),
    ("shapes:hard,noisy=0.1,noisy=0.2", "noisy=F' with F in"),
    ("shapes:hard,classes,noisy=0.3", "classification view"),
    ("shapes:hard,loud", "Unknown or repeated shapes option"),
])
def test_bad_noise_options(spec, match):
  with pytest.raises(errors.ConfigError, match=match):
    sources.make_source(spec, "train", 10, 0, 32)
