"""main.py trains on a `jsonl:` folder (2 grain workers) and evaluates zero-shot on an
`imagefolder:` one."""
import json
import os
import subprocess
import sys

from PIL import Image

from vlp_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(root, n):
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  source = shapes.ShapesSource("train", image_size=32, seed=3)
  with open(os.path.join(root, "train.jsonl"), "w") as f:
    for i in range(n):
      ex = source[i]
      Image.fromarray(ex["image"]).save(os.path.join(root, "images", f"{i}.jpg"))
      f.write(json.dumps({"image": f"images/{i}.jpg", "caption": ex["text"]}) + "\n")
  return os.path.join(root, "train.jsonl")


def write_imagefolder(root, per_class):
  source = shapes.ShapesSource("validation", image_size=32, seed=3)
  counts = {}
  i = 0
  while len(counts) < len(shapes.CLASS_NAMES) or min(counts.values()) < per_class:
    ex = source[i]
    i += 1
    name = shapes.CLASS_NAMES[ex["label"]].replace(" ", "_")
    if counts.get(name, 0) >= per_class:
      continue
    counts[name] = counts.get(name, 0) + 1
    os.makedirs(os.path.join(root, name), exist_ok=True)
    Image.fromarray(ex["image"]).save(os.path.join(root, name, f"{i}.png"))
  return root


def test_train_on_jsonl_and_zero_shot_on_imagefolder(tmp_path):
  train = write_jsonl(str(tmp_path / "jsonl"), 64)
  folder = write_imagefolder(str(tmp_path / "folder"), 1)
  workdir = str(tmp_path / "run")
  argv = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
          f"--config.data.source=jsonl:{train}", "--config.data.image_size=32",
          "--config.model.image.patch_size=8", "--config.model.image.depth=1",
          "--config.model.text.depth=1", "--config.model.decoder.depth=1",
          "--config.batch_size=16", "--config.total_steps=3", "--config.log_every=1",
          "--config.data.worker_count=2",  # grain worker processes under absl.app
          f"--config.evals.zeroshot.source=imagefolder:{folder}",
          "--config.evals.zeroshot.every=0", "--config.evals.retrieval.every=-1",
          "--config.evals.captioning.every=-1", "--config.plot=False"]
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  final = [r for r in rows if "eval/zeroshot/top1" in r][-1]
  assert final["eval/zeroshot/num_examples"] == len(shapes.CLASS_NAMES)
  assert 0.0 <= final["eval/zeroshot/top1"] <= final["eval/zeroshot/top5"] <= 1.0
