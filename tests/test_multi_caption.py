"""config.data.captions_per_image = k: k consecutive rows per source example (k captions,
k crops, one image_id), with the batch invariants of batches.py kept."""
import json
import os

import numpy as np
import pytest

from tests import datagen
from vlp_jax import batch_plan, cli, errors
from vlp_jax.data import mixture, pipeline, robust, tokenizers, transforms

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizers.get_tokenizer("bytes")
KEYS = ("image", "text", "label", "data_type", "image_id")


def write_jsonl(root, n, captions=4, bad=()):
  """n records 'r{i}' with `captions` captions 'r{i} c{j}' each; `bad`: garbage images."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "data.jsonl"), "w") as f:
    for i in range(n):
      with open(os.path.join(root, f"{i}.jpg"), "wb") as img:
        img.write(b"garbage" if i in bad else datagen.jpeg(i, size=(20, 24)))
      caps = [f"r{i} c{j}" for j in range(captions)]
      f.write(json.dumps({"image": f"{i}.jpg", "caption": caps}) + "\n")
  return "jsonl:" + os.path.join(root, "data.jsonl")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("multi")
  return {"jsonl": write_jsonl(str(root / "j"), 20),
          "bad": write_jsonl(str(root / "b"), 20, bad={2, 5, 11}),
          "wds": "wds:" + datagen.write_wds(str(root / "w"), 2, 6)}


def small_config(source, batch_size=6, k=3, **data):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.batch_size = batch_size
  c.data.update(source=source, image_size=16, tokenizer="bytes", captions_per_image=k,
                crop_scale=[0.3, 0.6], max_bad_fraction=0.5)
  c.data.update(data)
  c.model.text.context_length = 12
  return c


def take(config, n, plan=None):
  it = iter(pipeline.train_dataset(config, TOKENIZER, plan))
  out = [pipeline.split_bad_counts(next(it)) for _ in range(n)]
  if hasattr(it, "close"):
    it.close()
  return [b for b, _ in out], [s for _, s in out]


def groups(batch, k):
  """Rows of each example: [(image_id, [captions])]."""
  out = []
  for g in range(0, len(batch["text"]), k):
    ids = set(batch["image_id"][g:g + k].tolist())
    assert len(ids) == 1, batch["image_id"]
    out.append((ids.pop(), [TOKENIZER.decode(t) for t in batch["text"][g:g + k]]))
  return out


def test_transform_gives_k_rows_of_one_example():
  transform = transforms.TrainTransform(TOKENIZER, 16, 12, "unit", crop_scale=(0.2, 0.4),
                                        captions_per_image=3)
  image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
  element = {"image": image, "text": ["a", "b", "c", "d", "e"], "key": "x"}
  for seed in range(5):
    out = transform.random_map(element, np.random.default_rng(seed))
    assert out["image"].shape == (3, 16, 16, 3) and out["text"].shape == (3, 12)
    texts = [TOKENIZER.decode(t) for t in out["text"]]
    assert len(set(texts)) == 3  # Without replacement when there are >= k captions.
    assert not np.array_equal(out["image"][0], out["image"][1])  # Own crops.
    assert out["image_id"].tolist() == [transforms.example_id("x")] * 3
    assert out["label"].tolist() == out["data_type"].tolist() == [0, 0, 0]
    assert out["label"].dtype == out["image_id"].dtype == np.int32
  # Fewer captions than k: drawn with replacement.
  out = transform.random_map(dict(element, text=["a", "b"]), np.random.default_rng(1))
  assert {TOKENIZER.decode(t) for t in out["text"]} <= {"a", "b"}


def test_batches_hold_k_captions_per_example(data):
  batches_, _ = take(small_config(data["jsonl"]), 3)
  seen = []
  for batch in batches_:
    assert batch["image"].shape == (6, 16, 16, 3) and batch["text"].shape == (6, 12)
    for image_id, caps in groups(batch, 3):
      record = caps[0].split()[0]
      assert len(set(caps)) == 3 and all(c.split()[0] == record for c in caps)
      assert image_id == transforms.example_id(
          os.path.join(os.path.dirname(data["jsonl"][6:]), f"{record[1:]}.jpg"))
      seen.append(record)
  assert len(set(seen)) == 6  # 6 examples, 2 per batch, all different.
  # Batch b holds stream elements b*B/k ..: the same examples as k = 1 with B/k rows.
  ones, _ = take(small_config(data["jsonl"], batch_size=2, k=1), 3)
  for batch, one in zip(batches_, ones):
    np.testing.assert_array_equal(batch["image_id"][::3], one["image_id"])


def test_processes_build_their_rows_of_the_same_batches(data):
  config = small_config(data["jsonl"], batch_size=12)
  ref, _ = take(config, 2)
  parts = [take(config, 2, batch_plan.make(12, process_count=2, process_index=p))[0]
           for p in range(2)]
  for b in range(2):
    assert parts[0][b]["text"].shape[0] == 6
    for key in KEYS:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][b][key], parts[1][b][key]]), ref[b][key])


def test_bad_records_are_replaced_by_whole_examples(data):
  config = small_config(data["bad"], batch_size=12)
  batches_, stats = take(config, 5)
  records = []
  for batch in batches_:
    for _, caps in groups(batch, 3):
      records.append(caps[0].split()[0])
      assert len(set(caps)) == 3
  assert not {"r2", "r5", "r11"} & set(records)
  assert stats[-1]["bad/unreadable"] >= 1  # 20 elements read: an epoch of 20 records.


def test_resume_with_k_rows(data):
  config = small_config(data["jsonl"])
  it = iter(pipeline.train_dataset(config, TOKENIZER))
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  it = iter(pipeline.train_dataset(config, TOKENIZER))
  it.set_state(state)
  for batch in want:
    got = next(it)
    for key in KEYS:
      np.testing.assert_array_equal(got[key], batch[key])


def test_wds_streams_k_rows_per_sample(data):
  batches_, _ = take(small_config(data["wds"], shuffle_buffer=0), 2)
  for batch in batches_:
    assert batch["text"].shape == (6, 12)
    for _, caps in groups(batch, 3):
      assert len(set(caps)) == 1  # One caption per sample: repeated, k crops.


def test_k_must_divide_each_process_rows(data):
  with pytest.raises(errors.ConfigError) as e:
    pipeline.train_dataset(small_config(data["jsonl"], batch_size=8), TOKENIZER)
  msg = str(e.value)
  assert "config.data.captions_per_image=3" in msg and "config.batch_size=8" in msg
  assert "multiple of 3, e.g. 6 or 9" in msg
  with pytest.raises(errors.ConfigError, match="captions_per_image=3"):
    mixture.check_config(small_config(data["jsonl"], batch_size=8))
  # 12 rows over 2 processes: 6 each, fine for k = 3, not for k = 4 (3 each).
  plan = batch_plan.make(12, process_count=2, process_index=1)
  with pytest.raises(errors.ConfigError, match=r"2 processes = 6 rows per process.*"
                     r"multiple of 8, e.g. 8 or 16"):
    pipeline.train_dataset(small_config(data["jsonl"], batch_size=12, k=4), TOKENIZER,
                           plan)
  mixture.check_config(small_config(data["jsonl"], batch_size=12, k=4))  # 1 process.
  with pytest.raises(errors.ConfigError, match="captions_per_image=4"):
    mixture.check_config(small_config(data["jsonl"], batch_size=12, k=4), 2)


@pytest.mark.slow
def test_worker_count_does_not_change_k_row_batches(data):
  config = small_config(data["bad"], batch_size=12)
  ref, _ = take(config, 3)
  config.data.worker_count = 2
  got, _ = take(config, 3)
  for a, b in zip(ref, got):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_bad_marker_passes_through_the_k_row_transform():
  transform = robust.safe_transform(transforms.TrainTransform(
      TOKENIZER, 16, 12, captions_per_image=2, clean_captions=True))
  out = transform({"image": np.zeros((8, 8, 3), np.uint8), "text": [" "], "key": "z"},
                  np.random.default_rng(0))
  assert robust.is_bad(out) and out["_bad"] == "bad_caption"
