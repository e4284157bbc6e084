"""Writes realistic benchmark data: photo-like JPEGs with captions, as jsonl and ArrayRecord.

    .venv/bin/python tools/make_bench_data.py --out=/tmp/bench_data --num=2048

Each image is 256-512 px on each side (random, so crops and decode sizes vary like
web data), textured like a photo (1/f colour noise, shapes with soft edges, grain)
so its JPEG (quality 90) is about as large as a real photo's (1.5-3 bits per pixel,
the range of scikit-learn's two sample photos), not a flat gradient that compresses
to nothing. Deterministic from --seed. Writes

  OUT/images/NNNNNN.jpg + OUT/train.jsonl     -> --config.data.source=jsonl:OUT/train.jsonl
  OUT/shards/train-*-of-*                     -> --config.data.source=arrayrecord:GLOB

and prints both specs (the ArrayRecord shards hold the same JPEG bytes and captions).
"""
import argparse
import io
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.data import sources_arrayrecord  # pylint: disable=g-import-not-at-top

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black",
           "brown", "grey")
THINGS = ("circle", "box", "blob", "stripe", "patch")
SCENES = ("a photo of", "a close-up of", "a blurry picture of", "a picture showing")


def _noise_field(rng, h, w):
  """Colour 1/f noise in [0, 1], float32 [h, w, 3]: octaves of upsampled random grids."""
  out = np.zeros((h, w, 3), np.float32)
  amp, total = 1.0, 0.0
  for cells in (2, 4, 8, 16, 32, 64, 128):
    grid = rng.random((cells, cells, 3), dtype=np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    out += amp * np.asarray(img, np.float32) / 255.0
    total += amp
    amp *= 0.6
  out /= total
  return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def photo_like(rng: np.random.Generator, h: int, w: int):
  """A textured uint8 [h, w, 3] image and its caption."""
  base = _noise_field(rng, h, w)
  tint = rng.random(3, dtype=np.float32) * 0.6 + 0.4
  img = Image.fromarray(np.clip(base * tint * 255, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  words = []
  for _ in range(int(rng.integers(2, 6))):
    ci, ti = int(rng.integers(len(COLOURS))), int(rng.integers(len(THINGS)))
    x0, y0 = int(rng.integers(w)), int(rng.integers(h))
    x1 = x0 + int(rng.integers(w // 8, w // 2))
    y1 = y0 + int(rng.integers(h // 8, h // 2))
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    if THINGS[ti] in ("circle", "blob"):
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    words.append(f"{COLOURS[ci]} {THINGS[ti]}")
  img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
  arr = np.asarray(img, np.float32)
  arr += rng.normal(0.0, float(rng.uniform(3, 8)), arr.shape).astype(np.float32)  # grain
  caption = f"{SCENES[int(rng.integers(len(SCENES)))]} {', '.join(words)}"
  return np.clip(arr, 0, 255).astype(np.uint8), caption


def jpeg_bytes(image_u8: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image_u8).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def make(out: str, num: int, seed: int = 0, min_side: int = 256, max_side: int = 512,
         quality: int = 90, num_shards: int = 4) -> dict:
  """Writes the images, OUT/train.jsonl and the ArrayRecord shards; returns
  {'jsonl': spec, 'arrayrecord': spec, 'num': n, 'mean_bytes': ..., 'bits_per_pixel': ...}."""
  if num < 1 or not 1 <= min_side <= max_side:
    raise ValueError(f"Need num >= 1 and 1 <= min_side <= max_side, got num={num}, "
                     f"min_side={min_side}, max_side={max_side}.")
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  rng = np.random.default_rng(seed)
  lines, records, nbytes, pixels = [], [], 0, 0
  for i in range(num):
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    image, caption = photo_like(rng, h, w)
    data = jpeg_bytes(image, quality)
    name = f"images/{i:06d}.jpg"
    with open(os.path.join(out, name), "wb") as f:
      f.write(data)
    lines.append(json.dumps({"image": name, "caption": caption}))
    records.append(sources_arrayrecord.encode_record(data, caption, key=name))
    nbytes, pixels = nbytes + len(data), pixels + h * w
  with open(os.path.join(out, "train.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  shards = min(num_shards, num)
  pattern = os.path.join(out, "shards", "train")
  sources_arrayrecord.write_shards(records, pattern, shards)
  return {"jsonl": f"jsonl:{os.path.join(out, 'train.jsonl')}",
          "arrayrecord": f"arrayrecord:{pattern}-*-of-{shards:05d}", "num": num,
          "mean_bytes": nbytes / num, "bits_per_pixel": 8 * nbytes / pixels}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num", type=int, default=1024, help="images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_side", type=int, default=256)
  parser.add_argument("--max_side", type=int, default=512)
  parser.add_argument("--quality", type=int, default=90)
  parser.add_argument("--num_shards", type=int, default=4)
  args = parser.parse_args()
  try:
    info = make(args.out, args.num, args.seed, args.min_side, args.max_side,
                args.quality, args.num_shards)
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {info['num']} JPEGs (mean {info['mean_bytes'] / 1024:.1f} KiB, "
        f"{info['bits_per_pixel']:.2f} bits/pixel) to {args.out}")
  print(f"--config.data.source={info['jsonl']}")
  print(f"--config.data.source={info['arrayrecord']}")


if __name__ == "__main__":
  main()
