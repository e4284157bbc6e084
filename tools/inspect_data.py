"""Prints a few decoded examples of a data source and writes a PNG grid of them.

    .venv/bin/python tools/inspect_data.py --source=arrayrecord:/d/shards/train-* \
        --n=8 --out=grid.png
"""
import argparse
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.data import decode  # pylint: disable=g-import-not-at-top
from vlp_jax.data import sources  # pylint: disable=g-import-not-at-top
from vlp_jax.data import transforms  # pylint: disable=g-import-not-at-top


def _captions(text):
  return [text] if isinstance(text, str) else [str(t) for t in text]


def inspect(spec: str, split: str = "train", n: int = 8, image_size: int = 224,
            out: str = "grid.png", seed: int = 0) -> str:
  """Prints the first `n` examples of `spec` and saves their grid to `out`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  source = sources.make_source(spec, split, 0, seed, image_size)
  n = min(n, len(source))
  print(f"source {spec!r} split {split!r}: {len(source)} examples")
  shown = []
  for i in range(n):
    try:
      ex = source[i]
      image = transforms.as_image_u8(ex["image"])  # Sources may give encoded bytes.
    except decode.BadRecord as e:
      print(f"[{i}] bad record ({e.kind}): {e}")
      continue
    captions = _captions(ex["text"])
    extra = {k: v for k, v in ex.items() if k not in ("image", "text", "key")}
    print(f"[{i}] key={ex.get('key', i)} image={image.shape} {image.dtype}"
          f"{' ' + str(extra) if extra else ''}")
    for c in captions:
      print(f"      - {c}")
    shown.append((image, captions[0] if captions else ""))
  cols = min(4, max(1, len(shown)))
  rows = max(1, int(np.ceil(len(shown) / cols)))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < len(shown):
      image, caption = shown[i]
      ax.imshow(image)
      ax.set_title("\n".join(textwrap.wrap(caption, 40)[:3]), fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  print(f"wrote {out}")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True, help="data spec, e.g. jsonl:/d/a.jsonl")
  parser.add_argument("--split", default="train")
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--out", default="grid.png")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  inspect(args.source, args.split, args.n, args.image_size, args.out, args.seed)


if __name__ == "__main__":
  main()
