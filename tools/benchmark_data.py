"""Single-core throughput of the per-image input work: decode + crop + normalise +
tokenize, for the old path (full decode to an array, crop from it) and the new one
(crop boxes from the header size, JPEG decoded at a reduced DCT scale when the crop
allows, crop from the PIL image, one-pass normalise), in the same run.

    .venv/bin/python tools/benchmark_data.py --n=256 --image_size=224
    .venv/bin/python tools/benchmark_data.py --folder=/my/photos --crop_scale=0.08,1.0
    .venv/bin/python tools/benchmark_data.py --folder=/my/photos --crop_scale=center

Without --folder, random-size JPEGs (smooth gradients + noise) are generated in a
temp dir; with it, every *.jpg / *.jpeg / *.png / *.webp under the folder
(recursively) is used, cycled to --n. --crop_scale is 'A,B' (random resized crop with
area fraction in [A, B], ratio 3/4..4/3) or 'center' (resize + center crop). The two
paths alternate pass by pass (--repeats rounds each, pinned to one core) so machine
load hits both alike; medians are reported. Prints one JSON object: the new path's
figures at the top level, both paths under 'old' / 'new', and 'speedup' (new / old
images per second).
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
from PIL import Image  # pylint: disable=g-import-not-at-top
from vlp_jax.data import decode  # pylint: disable=g-import-not-at-top
from vlp_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
from vlp_jax.data import transforms  # pylint: disable=g-import-not-at-top
from vlp_jax.data import views  # pylint: disable=g-import-not-at-top

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
RATIO = (3 / 4, 4 / 3)
STAGES = ("decode", "crop", "normalize", "tokenize")


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
  """Writes n JPEGs of random size; returns their paths."""
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
    out.append(path)
  return out


def folder_images(folder: str, n: int):
  """Every image file under `folder` (recursively, sorted), cycled to n paths."""
  if not os.path.isdir(folder):
    raise SystemExit(f"--folder '{folder}' is not a folder; pass a folder of images.")
  found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                 if f.lower().endswith(IMAGE_EXTS))
  if not found:
    raise SystemExit(f"--folder '{folder}' holds no {'/'.join(IMAGE_EXTS)} files.")
  return [found[i % len(found)] for i in range(n)]


def parse_crop(text: str):
  """'A,B' -> (A, B); 'center' -> None."""
  if text == "center":
    return None
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise SystemExit(f"--crop_scale={text!r}: use 'A,B' (e.g. 0.9,1.0) or 'center'.")
  if not 0 < lo <= hi <= 1:
    raise SystemExit(f"--crop_scale={text!r}: need 0 < A <= B <= 1.")
  return (lo, hi)


def _old_normalize(image_u8, kind="clip"):
  """The three-step normalisation the transforms used before."""
  mean, std = transforms.normalization_constants(kind)
  return (image_u8.astype(np.float32) / 255.0 - mean) / std


def _old_center_crop(image_u8, size):
  """resize_center_crop as it was: resize the whole image, then cut the center."""
  h, w = image_u8.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = Image.fromarray(image_u8).resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(img)[top:top + size, left:left + size]


def old_pass(items, size, crop_scale, tokenizer, rng):
  """Seconds per stage over items: full decode to an array, crop, 3-step normalise."""
  t = np.zeros(4)
  for path, caption in items:
    t0 = time.perf_counter()
    image = decode.load_image(path)
    t1 = time.perf_counter()
    if crop_scale is None:
      out = _old_center_crop(image, size)
    else:
      out = transforms.random_resized_crop(image, size, rng, scale=crop_scale,
                                           ratio=RATIO)
    t2 = time.perf_counter()
    _old_normalize(out)
    t3 = time.perf_counter()
    tokenizer.tokenize([caption], 77)
    t4 = time.perf_counter()
    t += (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
  return t


def new_pass(items, size, crop_scale, tokenizer, rng, reductions):
  """Seconds per stage over items: the TrainTransform path (bytes, boxes from the
  header size, reduced decode, crop from the PIL image, one-pass normalise)."""
  t = np.zeros(4)
  for path, caption in items:
    t0 = time.perf_counter()
    opened = decode.open_image(decode.read_file(path))
    w, h = opened.size
    if crop_scale is None:
      box = transforms.center_crop_box(h, w, size)
    else:
      box = views.random_crop_box(h, w, rng, crop_scale, RATIO)
    decoded = transforms.decode_for(opened, [(box, size)])
    t1 = time.perf_counter()
    out = np.asarray(decoded.resize(box, size))
    t2 = time.perf_counter()
    transforms.normalize(out, "clip")
    t3 = time.perf_counter()
    tokenizer.tokenize([caption], 77)
    t4 = time.perf_counter()
    t += (t1 - t0, t2 - t1, t3 - t2, t4 - t3)
    reductions[decoded.reduce] = reductions.get(decoded.reduce, 0) + 1
  return t


def _summary(passes, n):
  med = [statistics.median(p[k] for p in passes) for k in range(4)]
  total = statistics.median(sum(p) for p in passes)
  out = {f"{s}_ms_per_image": round(1000 * m / n, 3) for s, m in zip(STAGES, med)}
  out["images_per_sec_per_core"] = round(n / total, 2)
  no_norm = statistics.median(sum(p) - p[2] for p in passes)
  out["images_per_sec_per_core_without_normalize"] = round(n / no_norm, 2)
  return out


def benchmark(n: int = 256, min_side: int = 256, max_side: int = 512,
              image_size: int = 224, repeats: int = 3, seconds: float = 0.0,
              seed: int = 0, folder: str = "", crop: str = "0.9,1.0") -> dict:
  """Alternates old / new passes (>= `repeats` each, more until `seconds`)."""
  crop_scale = parse_crop(crop)
  pinned = None
  if hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    pinned = cpus[0]
    os.sched_setaffinity(0, {pinned})
  tokenizer = tokenizers.ByteTokenizer()
  with tempfile.TemporaryDirectory() as tmp:
    paths = folder_images(folder, n) if folder else make_images(tmp, n, min_side,
                                                                max_side, seed)
    items = [(p, f"a photo number {i} from {os.path.basename(p)}")
             for i, p in enumerate(paths)]
    sizes = sorted({Image.open(p).size for p in set(paths)})
    reductions = {}
    warm = items[:min(8, n)]  # Warm-up (page cache, lazy imports).
    old_pass(warm, image_size, crop_scale, tokenizer, np.random.default_rng(seed))
    new_pass(warm, image_size, crop_scale, tokenizer, np.random.default_rng(seed), {})
    old, new = [], []
    start = time.perf_counter()
    while len(old) < repeats or time.perf_counter() - start < seconds:
      # The same seed per round: both paths crop the same boxes.
      old.append(old_pass(items, image_size, crop_scale, tokenizer,
                          np.random.default_rng(seed + len(old))))
      new.append(new_pass(items, image_size, crop_scale, tokenizer,
                          np.random.default_rng(seed + len(new)), reductions))
  result_old, result_new = _summary(old, n), _summary(new, n)
  return {
      **result_new,
      "old": result_old,
      "new": result_new,
      "speedup": round(result_new["images_per_sec_per_core"]
                       / result_old["images_per_sec_per_core"], 3),
      "decode_reductions": {str(k): v for k, v in sorted(reductions.items())},
      "n": n,
      "repeats": len(old),
      "source": folder or f"generated {min_side}..{max_side} px JPEGs",
      "image_sizes": [list(s) for s in sizes[:10]],
      "image_size": image_size,
      "crop_scale": crop,
      "pinned_cpu": pinned,
      "load_average": [round(v, 2) for v in os.getloadavg()],
      "cpu_model": cpu_model(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--folder", default="",
                      help="time these images (recursively) instead of generated ones")
  parser.add_argument("--min_side", type=int, default=256)
  parser.add_argument("--max_side", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--crop_scale", default="0.9,1.0",
                      help="'A,B' random resized crop area range, or 'center'")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=0.0,
                      help="keep repeating until this many seconds have passed")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.n < 1 or args.min_side < 1 or args.max_side < args.min_side:
    parser.error("need --n >= 1 and 1 <= --min_side <= --max_side")
  print(json.dumps(benchmark(args.n, args.min_side, args.max_side, args.image_size,
                             max(1, args.repeats), args.seconds, args.seed,
                             args.folder, args.crop_scale)))


if __name__ == "__main__":
  main()
