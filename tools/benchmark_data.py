"""Single-core throughput of the per-image input work: decode + crop + tokenize.

    .venv/bin/python tools/benchmark_data.py --n=256 --image_size=224

Generates random-size JPEGs (smooth gradients + noise) in a temp dir, then times
decode.load_image, random_resized_crop (scale (0.9, 1.0)) and ByteTokenizer
tokenization (context 77) per image, pinned to one core. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.data import decode  # pylint: disable=g-import-not-at-top
from vlp_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
from vlp_jax.data import transforms  # pylint: disable=g-import-not-at-top


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo, or '' when unavailable."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def make_images(folder: str, n: int, min_side: int, max_side: int, seed: int = 0):
  """Writes n JPEGs of random size; returns [(path, caption)]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = rng.integers(min_side, max_side + 1, size=2)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    a, b, c = rng.uniform(0, 255, size=(3, 1, 1, 3)).astype(np.float32)
    image = a * (1 - y) + b * x + c * y * (1 - x) * 0.5
    image = image + rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    out.append((path, f"a smooth gradient image number {i} of size {w} by {h}"))
  return out


def run_once(items, image_size, tokenizer, rng):
  """One pass over items; returns total seconds spent in (decode, crop, tokenize)."""
  t_dec = t_crop = t_tok = 0.0
  for path, caption in items:
    t0 = time.perf_counter()
    image = decode.load_image(path)
    t1 = time.perf_counter()
    transforms.random_resized_crop(image, image_size, rng, scale=(0.9, 1.0))
    t2 = time.perf_counter()
    tokenizer.tokenize([caption], 77)
    t3 = time.perf_counter()
    t_dec += t1 - t0
    t_crop += t2 - t1
    t_tok += t3 - t2
  return t_dec, t_crop, t_tok


def benchmark(n: int = 256, min_side: int = 256, max_side: int = 512,
              image_size: int = 224, repeats: int = 3, seconds: float = 0.0,
              seed: int = 0) -> dict:
  """Runs >= `repeats` passes (more until `seconds` elapsed); returns the results."""
  pinned = None
  if hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    pinned = cpus[0]
    os.sched_setaffinity(0, {pinned})
  tokenizer = tokenizers.ByteTokenizer()
  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory() as tmp:
    items = make_images(tmp, n, min_side, max_side, seed)
    run_once(items[:min(8, n)], image_size, tokenizer, rng)  # Warm-up (page cache).
    passes = []
    start = time.perf_counter()
    while len(passes) < repeats or time.perf_counter() - start < seconds:
      passes.append(run_once(items, image_size, tokenizer, rng))
  totals = [sum(p) for p in passes]
  median = statistics.median(totals)
  per_image_ms = lambda k: 1000 * statistics.median(p[k] for p in passes) / n
  return {
      "images_per_sec_per_core": round(n / median, 2),
      "decode_ms_per_image": round(per_image_ms(0), 3),
      "crop_ms_per_image": round(per_image_ms(1), 3),
      "tokenize_ms_per_image": round(per_image_ms(2), 3),
      "n": n,
      "repeats": len(passes),
      "min_side": min_side,
      "max_side": max_side,
      "image_size": image_size,
      "pinned_cpu": pinned,
      "cpu_model": cpu_model(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--min_side", type=int, default=256)
  parser.add_argument("--max_side", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=0.0,
                      help="keep repeating until this many seconds have passed")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.n < 1 or args.min_side < 1 or args.max_side < args.min_side:
    parser.error("need --n >= 1 and 1 <= --min_side <= --max_side")
  print(json.dumps(benchmark(args.n, args.min_side, args.max_side, args.image_size,
                             max(1, args.repeats), args.seconds, args.seed)))


if __name__ == "__main__":
  main()
