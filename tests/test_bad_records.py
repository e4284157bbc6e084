"""Bad records are skipped and counted; too many stop the run with a clear error."""
import collections
import io
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from tests import test_train
from vlp_jax.data import batches, pipeline, robust, tokenizers
from vlp_jax.train import loop, metric_writer as metrics_lib


def make_jsonl(root, n, bad_every):
  """n records; every `bad_every`-th is broken, cycling through the kinds of damage."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  lines, damage = [], ["truncated", "missing", "empty_caption", "garbage"]
  for i in range(n):
    name = f"{i}.jpg"
    caption = f"a photo of a red circle number {i}"
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    kind = damage[(i // bad_every) % len(damage)] if i % bad_every == bad_every - 1 else ""
    if kind == "truncated":
      data = data[: len(data) // 2]
    elif kind == "garbage":
      data = rng.bytes(300)
    elif kind == "empty_caption":
      caption = "   "
    if kind != "missing":
      with open(os.path.join(root, name), "wb") as f:
        f.write(data)
    lines.append(json.dumps({"image": name, "caption": caption}))
  path = os.path.join(root, "data.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def config_for(path, total_steps=6):
  c = test_train.tiny_config(total_steps=total_steps)
  c.data.source = f"jsonl:{path}"
  c.data.tokenizer = "bytes"
  c.model.text.vocab_size = 264
  c.checkpoint_every = 100
  return c


def test_counts_every_kind_of_bad_record(tmp_path):
  path = make_jsonl(tmp_path / "d", 200, bad_every=25)  # 8 bad = 4%
  config = config_for(path)
  config.data.max_bad_fraction = 0.1
  it = iter(pipeline.train_dataset(config, tokenizers.get_tokenizer("bytes")))
  for _ in range(30):  # 240 good examples: more than one pass over the data
    batch, stats = pipeline.split_bad_counts(next(it))
    assert batch["image"].shape == (8, 32, 32, 3)
  # Reference: walk the same shuffled stream; a bad record is replaced by its seeded
  # spares (batches.spare_index) until a good one is found.
  order = grain.MapDataset.range(200).seed(config.seed).shuffle().repeat()
  bad = {24: "truncated", 49: "missing_file", 74: "bad_caption", 99: "unreadable"}
  expected = collections.Counter()
  for j in range(240):
    index, attempt = order[j], 0
    while index % 25 == 24:
      expected[bad[index % 100]] += 1
      attempt += 1
      index = order[batches.spare_index(config.seed, j, attempt, 200)]
  assert stats["bad/fraction"] == pytest.approx(sum(expected.values()) /
                                                (240 + sum(expected.values())))
  assert stats["bad/missing_file"] == expected["missing_file"] >= 2
  assert stats["bad/bad_caption"] == expected["bad_caption"] >= 2
  assert stats["bad/truncated"] == expected["truncated"] >= 2
  assert stats["bad/unreadable"] == expected["unreadable"] >= 2


def test_one_percent_bad_trains_and_reports(tmp_path):
  path = make_jsonl(tmp_path / "d", 200, bad_every=100)  # 2 bad = 1%
  workdir = str(tmp_path / "run")
  loop.run(config_for(path, total_steps=20), workdir)  # 160 of the 198 good records
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert rows[-1]["step"] == 20
  bad = sum(v for k, v in rows[-1].items() if k.startswith("bad/") and k != "bad/fraction")
  assert bad in (1, 2)
  assert rows[-1]["bad/fraction"] == pytest.approx(bad / (160 + bad))


def test_twenty_percent_bad_stops_with_a_clear_error(tmp_path):
  path = make_jsonl(tmp_path / "d", 200, bad_every=5)  # 40 bad = 20%
  with pytest.raises(robust.TooManyBadRecords, match=r"jsonl:.*are bad .*max_bad_fraction"
                                                     r"=0.01.*By kind: .*e\.g\."):
    loop.run(config_for(path, total_steps=40), str(tmp_path / "run"))
