"""tools/make_bench_data.py: photo-like JPEGs as jsonl and ArrayRecord, both loadable."""
import hashlib
import os

import numpy as np
import pytest

from tests import tool_modules
from vlp_jax.data import sources, transforms

make_bench_data = tool_modules.load("make_bench_data")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench_data"))
  return out, make_bench_data.make(out, num=6, seed=3, min_side=64, max_side=96,
                                   num_shards=2)


def _digest(folder):
  h = hashlib.sha256()
  for name in sorted(os.listdir(os.path.join(folder, "images"))):
    with open(os.path.join(folder, "images", name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def test_both_outputs_load_through_the_real_sources(data):
  _, info = data
  as_jsonl = sources.make_source(info["jsonl"], "train", 0, 0, 32)
  as_records = sources.make_source(info["arrayrecord"], "train", 0, 0, 32)
  assert len(as_jsonl) == len(as_records) == 6
  captions = set()
  for i in range(6):
    a = as_jsonl[i]
    image = transforms.as_image_u8(a["image"])
    assert 64 <= min(image.shape[:2]) and max(image.shape[:2]) <= 96
    assert image.std() > 10  # textured, not flat
    assert isinstance(a["text"], str) and a["text"]
    captions.add(a["text"])
  # Shards are written round-robin: the same examples, in shard order.
  for i in range(6):
    r = as_records[i]
    assert r["text"] in captions
    assert transforms.as_image_u8(r["image"]).ndim == 3
  # Realistic JPEG sizes: neither flat (tiny files) nor incompressible noise.
  assert 0.7 < info["bits_per_pixel"] < 6


def test_deterministic_from_the_seed(data, tmp_path):
  folder, _ = data
  again = make_bench_data.make(str(tmp_path / "a"), num=6, seed=3, min_side=64,
                               max_side=96, num_shards=2)
  other = make_bench_data.make(str(tmp_path / "b"), num=6, seed=4, min_side=64,
                               max_side=96, num_shards=2)
  assert _digest(folder) == _digest(str(tmp_path / "a"))
  assert _digest(folder) != _digest(str(tmp_path / "b"))
  assert np.isclose(again["mean_bytes"], data[1]["mean_bytes"])
  assert other["num"] == 6


def test_bad_sizes_are_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="min_side <= max_side"):
    make_bench_data.make(str(tmp_path), num=2, min_side=100, max_side=50)
