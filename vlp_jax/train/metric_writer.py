"""Metric logging: console, `metrics.jsonl` (one object per line with a `step` key),
TensorBoard event files, and a PNG plot of the curves at the end."""
import json
import math
import os

import numpy as np


def _scalar(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)


class MetricWriter:
  """Writes metrics on process 0 only; resuming drops rows past the restored step."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step):
    if not os.path.exists(self.path):
      return
    rows = read_metrics(self.path)
    with open(self.path, "w") as f:
      for row in rows:
        if row["step"] <= step:
          f.write(json.dumps(row) + "\n")

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_metrics(path: str):
  """The rows of a metrics.jsonl; a last line cut short by a kill is ignored."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def plot_curves(workdir: str, keys_prefixes=("loss", "eval/")):
  """Writes `workdir/curves.png`: training losses and evaluation metrics over steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  train_keys = sorted({k for r in rows for k in r
                       if k == "loss" or k.endswith("/loss") and not k.startswith("eval/")})
  eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/")
                      and "/num_" not in k and isinstance(r[k], float)})
  unit = [k for k in eval_keys if all(0 <= r[k] <= 1 for r in rows if k in r)]
  other = [k for k in eval_keys if k not in unit]
  panels = [(train_keys, "training loss"), (unit, "evaluation (accuracy, recall)")]
  if other:
    panels.append((other, "evaluation (other scales)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
  for ax, (keys, title) in zip(axes, panels):
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), float)]
      if pts:
        ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    if keys:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
