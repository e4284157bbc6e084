"""The curation report: counts per rule (JSON + markdown), a histogram of the
image-text scores (kept / dropped), and a grid of kept and dropped examples."""
import json
import os
import textwrap
from typing import Dict, List, Optional

import numpy as np


def corruption_scores(keep: np.ndarray, corrupted: np.ndarray) -> Dict[str, float]:
  """How well curation removed known-corrupted records: precision = corrupted share
  of the removed records, recall = removed share of the corrupted ones."""
  removed = ~np.asarray(keep, bool)
  corrupted = np.asarray(corrupted, bool)
  hit = int((removed & corrupted).sum())
  return {"corrupted": int(corrupted.sum()), "removed": int(removed.sum()),
          "removed_corrupted": hit,
          "precision": hit / max(int(removed.sum()), 1),
          "recall": hit / max(int(corrupted.sum()), 1),
          "kept_corrupted_fraction": int((~removed & corrupted).sum()) / max(
              int((~removed).sum()), 1)}


def write_counts(out_dir: str, summary: Dict) -> List[str]:
  """counts.json and counts.md of `summary` ({'source', 'rules': [...], ...})."""
  os.makedirs(out_dir, exist_ok=True)
  js = os.path.join(out_dir, "counts.json")
  with open(js, "w") as f:
    json.dump(summary, f, indent=2, default=float)
  lines = [f"# Curation of `{summary['source']}` ({summary['split']})", "",
           f"{summary['total']} records -> {summary['kept']} kept "
           f"({summary['kept'] / max(summary['total'], 1):.1%}).", "",
           "| rule | in | out | dropped | options |", "|---|---|---|---|---|"]
  for r in summary["rules"]:
    opts = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("rule", "in", "out"))
    lines.append(f"| {r['rule']} | {r['in']} | {r['out']} | {r['in'] - r['out']} | "
                 f"{opts} |")
  if summary.get("corruption"):
    c = summary["corruption"]
    lines += ["", f"Known corrupted captions: {c['corrupted']}; removed "
              f"{c['removed_corrupted']} of them (recall {c['recall']:.3f}); "
              f"precision of the removal {c['precision']:.3f}; corrupted share of the "
              f"kept records {c['kept_corrupted_fraction']:.3f}."]
  md = os.path.join(out_dir, "counts.md")
  with open(md, "w") as f:
    f.write("\n".join(lines) + "\n")
  return [js, md]


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def score_histogram(path: str, scores: np.ndarray, keep: np.ndarray,
                    corrupted: Optional[np.ndarray] = None) -> str:
  """PNG histogram of the finite scores: kept vs dropped (and corrupted, if known)."""
  plt = _plt()
  finite = np.isfinite(scores)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.linspace(scores[finite].min(), scores[finite].max(), 41) if finite.any() \
      else 10
  ax.hist(scores[finite & keep], bins=bins, alpha=0.6, label="kept")
  ax.hist(scores[finite & ~keep], bins=bins, alpha=0.6, label="dropped")
  if corrupted is not None:
    ax.hist(scores[finite & corrupted], bins=bins, histtype="step", color="k",
            label="corrupted caption")
  ax.set_xlabel("image-caption cosine similarity")
  ax.set_ylabel("records")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def example_grid(path: str, examples: List[Dict], title: str = "", tile: int = 160,
                 cols: int = 4) -> str:
  """PNG grid (PIL): each example {'image': uint8 [H, W, 3], 'caption', 'score',
  'status', optionally 'corrupted'} as its image with status, score and caption below
  (green: kept, red: dropped)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  font = ImageFont.load_default()
  text_h, head = 58, (24 if title else 4)
  cols = min(cols, max(1, len(examples)))
  rows = max(1, -(-len(examples) // cols))
  pad = 6
  canvas = Image.new("RGB", (cols * (tile + pad) + pad,
                             head + rows * (tile + text_h + pad)), "white")
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((pad, 6), title, fill="black", font=font)
  for k, e in enumerate(examples):
    x = pad + (k % cols) * (tile + pad)
    y = head + (k // cols) * (tile + text_h + pad)
    image = Image.fromarray(np.asarray(e["image"], np.uint8)).resize((tile, tile),
                                                                      Image.NEAREST)
    canvas.paste(image, (x, y))
    color = (0, 130, 0) if e["status"] == "kept" else (200, 0, 0)
    lines = [(f"{e['status']} ({e['score']:.3f})", color)]
    if e.get("corrupted"):
      lines.append(("(corrupted caption)", (200, 100, 0)))
    lines += [(t, "black") for t in textwrap.wrap(e["caption"], 26)[:4 - len(lines)]]
    for j, (line, fill) in enumerate(lines):
      draw.text((x, y + tile + 2 + 13 * j), line, fill=fill, font=font)
  canvas.save(path)
  return path
