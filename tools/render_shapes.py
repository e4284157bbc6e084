"""Writes a PNG grid of `shapes` examples with their first caption.

    .venv/bin/python tools/render_shapes.py --out=/tmp/shapes.png --split=train --n=16
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.data import shapes  # pylint: disable=g-import-not-at-top


def render_grid(split: str, n: int, image_size: int, seed: int, out: str):
  """Saves an n-image grid (4 per row) with captions as titles; returns `out`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  source = shapes.ShapesSource(split, seed=seed, image_size=image_size)
  cols = 4
  rows = int(np.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < n:
      ex = source[i]
      ax.imshow(ex["image"])
      ax.set_title(ex["text"][0], fontsize=7, wrap=True)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="shapes.png")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--n", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(render_grid(args.split, args.n, args.image_size, args.seed, args.out))


if __name__ == "__main__":
  main()
