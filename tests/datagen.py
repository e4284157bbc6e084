"""Small generated data sets (tiny JPEGs + captions) in every on-disk format, for tests."""
import io
import json
import os

import numpy as np
from PIL import Image

from vlp_jax.data import sources_arrayrecord, sources_wds


def jpeg(seed: int, size=(12, 16)) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def write_jsonl(root, n, prefix="j", bad=()):
  """n records captioned '{prefix} {i}'; indices in `bad` have garbage image bytes."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "data.jsonl"), "w") as f:
    for i in range(n):
      with open(os.path.join(root, f"{i}.jpg"), "wb") as img:
        img.write(b"garbage" if i in bad else jpeg(i))
      f.write(json.dumps({"image": f"{i}.jpg", "caption": f"{prefix} {i}"}) + "\n")
  return os.path.join(root, "data.jsonl")


def write_arrayrecord(root, n, prefix="a", num_shards=2):
  """n records captioned '{prefix} {i}'; returns the glob."""
  records = (sources_arrayrecord.encode_record(jpeg(1000 + i), f"{prefix} {i}")
             for i in range(n))
  sources_arrayrecord.write_shards(records, os.path.join(root, "rec.arrayrecord"),
                                   num_shards)
  return os.path.join(root, "rec.arrayrecord-*")


def write_wds(root, num_shards, per_shard, prefix="w", corrupt=(), no_caption=()):
  """Tar shards shard-000.tar ...; sample (s, i) captioned '{prefix} {s} {i}' in .txt
  (odd i: in .json). (s, i) in `corrupt`: garbage image; in `no_caption`: no caption.
  Returns the brace pattern."""
  for s in range(num_shards):
    samples = []
    for i in range(per_shard):
      caption = f"{prefix} {s} {i}"
      files = {"jpg": b"garbage" if (s, i) in corrupt else jpeg(2000 + s * 100 + i)}
      if (s, i) not in no_caption:
        if i % 2:
          files["json"] = json.dumps({"caption": caption})
        else:
          files["txt"] = caption
      samples.append((f"{s:03d}/{i:04d}", files))
    sources_wds.write_shard(os.path.join(root, f"shard-{s:03d}.tar"), samples)
  return os.path.join(root, "shard-{000..%03d}.tar" % (num_shards - 1))
