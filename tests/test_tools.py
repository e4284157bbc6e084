"""Tests for tools/build_arrayrecord.py, tools/inspect_data.py, tools/benchmark_data.py."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from vlp_jax.data import sources, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tool, *args):
  proc = subprocess.run([sys.executable, os.path.join("tools", tool), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _make_jsonl(folder):
  """10 good images (some larger than 64 px), a corrupt file and an empty caption."""
  rng = np.random.default_rng(0)
  lines, expected = [], {}
  for i in range(10):
    h, w = (40 + 10 * i, 100) if i % 2 else (30, 50)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder, f"{i}.png"))
    lines.append({"image": f"{i}.png", "caption": f"caption {i}"})
    scale = min(1.0, 64 / max(h, w))
    expected[f"caption {i}"] = (round(h * scale), round(w * scale))
  with open(os.path.join(folder, "bad.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  lines.append({"image": "bad.jpg", "caption": "broken"})
  lines.append({"image": "0.png", "caption": "   "})
  path = os.path.join(folder, "a.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(l) for l in lines) + "\n")
  return path, expected


def test_build_and_inspect(tmp_path):
  path, expected = _make_jsonl(str(tmp_path))
  out = _run("build_arrayrecord.py", f"--source=jsonl:{path}",
             f"--out={tmp_path}/shards/train", "--num_shards=3", "--max_side=64",
             "--workers=2", "--no_progress")
  assert "wrote 10 records to 3 shard(s); skipped 2 bad record(s)" in out
  assert "bad unreadable: 1" in out and "bad bad_caption: 1" in out
  spec = out.strip().splitlines()[-1].split("=", 1)[1]
  assert spec.startswith("arrayrecord:")
  source = sources.make_source(spec, "train", 0, 0, 224)
  assert len(source) == 10
  seen = {}
  for i in range(len(source)):
    ex = source[i]
    seen[ex["text"]] = transforms.as_image_u8(ex["image"]).shape[:2]
  assert seen == expected

  grid = str(tmp_path / "grid.png")
  out = _run("inspect_data.py", f"--source={spec}", "--n=5", f"--out={grid}")
  assert "caption" in out and os.path.getsize(grid) > 0
  assert Image.open(grid).format == "PNG"


def test_benchmark_runs():
  out = _run("benchmark_data.py", "--n=4", "--min_side=64", "--max_side=96",
             "--image_size=32", "--repeats=2")
  result = json.loads(out.strip().splitlines()[-1])
  assert result["images_per_sec_per_core"] > 0
  for k in ("decode_ms_per_image", "crop_ms_per_image", "tokenize_ms_per_image"):
    assert result[k] >= 0
  assert "cpu_model" in result


def test_build_from_wds_shards(tmp_path):
  from tests import datagen  # pylint: disable=g-import-not-at-top
  pattern = datagen.write_wds(str(tmp_path / "wds"), 3, 4, corrupt={(1, 1)},
                              no_caption={(2, 3)})
  out = _run("build_arrayrecord.py", f"--source=wds:{pattern}",
             f"--out={tmp_path}/shards/train", "--num_shards=2", "--max_side=8",
             "--workers=2", "--no_progress")
  assert "wrote 10 records to 2 shard(s); skipped 2 bad record(s)" in out
  assert "bad unreadable: 1" in out and "bad bad_caption: 1" in out
  spec = out.strip().splitlines()[-1].split("=", 1)[1]
  source = sources.make_source(spec, "train", 0, 0, 224)
  got = {source[i]["text"]: source[i] for i in range(len(source))}
  expected = {f"w {s} {i}" for s in range(3) for i in range(4)} - {"w 1 1", "w 2 3"}
  assert set(got) == expected
  assert got["w 0 1"]["key"].endswith("shard-000.tar:000/0001")
  assert transforms.as_image_u8(got["w 0 0"]["image"]).shape == (6, 8, 3)  # 12 x 16 resized to max side 8
