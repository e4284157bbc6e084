"""Collects a sweep's results (experiments/sweep.py) into one CSV, a markdown table
(member x metric) and a PNG (each metric against step, one line per series).

    .venv/bin/python tools/collect_sweep.py runs/sweep [--metrics='zeroshot/top1|i2t_r1']

Reads WORKDIR/status.json (the members in sweep order: kind, series, step, status,
error, log) and each member's figures: an evaluation member's results.json, a training
member's metrics.jsonl (its evaluation rows; the table shows the last). Writes
WORKDIR/results.csv, results.md and results.png; `experiments/sweep.py` does so after
every member.
"""
import argparse
import csv
import json
import math
import os
import re
import sys

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"  # = vlp_jax.train.evaluation.RESULTS_FILE


def read_status(workdir: str) -> dict:
  """WORKDIR/status.json ({'members': [...]}); a missing file is an empty sweep."""
  path = os.path.join(workdir, STATUS_FILE)
  if not os.path.exists(path):
    return {"members": []}
  with open(path) as f:
    return json.load(f)


def _is_metric(key, value) -> bool:
  return (key.startswith("eval/") and "/num_" not in key and isinstance(value, float)
          and math.isfinite(value))


def member_points(member: dict) -> list:
  """[(step, {metric: value})] of one member, in step order ([] if it has none)."""
  if member["kind"] == "eval":
    path = os.path.join(member["dir"], RESULTS_FILE)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      res = json.load(f)
    return [(res["step"], {k: v for k, v in res["metrics"].items() if _is_metric(k, v)})]
  path = os.path.join(member["dir"], "metrics.jsonl")
  if not os.path.exists(path):
    return []
  points = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      metrics = {k: v for k, v in row.items() if _is_metric(k, v)}
      if metrics:
        points.setdefault(row["step"], {}).update(metrics)
  return sorted(points.items())


def collect(workdir: str, metrics_regex: str = ""):
  """(rows, points, metric names): one row per member (its last point's figures),
  points[series] = [(step, {metric: value})] over all members of that series."""
  members = read_status(workdir)["members"]
  rows, points, names = [], {}, set()
  for m in members:
    pts = member_points(m) if m["status"] == "done" else []
    step, last = (pts[-1] if pts else (m.get("step"), {}))
    rows.append(dict(member=m["name"], kind=m["kind"], series=m["series"], step=step,
                     status=m["status"], error=m.get("error", ""), log=m.get("log", ""),
                     metrics=last))
    points.setdefault(m["series"], []).extend(pts)
    names.update(last)
  pattern = re.compile(metrics_regex) if metrics_regex else None
  names = sorted(n for n in names if pattern is None or pattern.search(n))
  return rows, {s: sorted(p, key=lambda x: x[0]) for s, p in points.items()}, names


def write_csv(rows, names, path: str):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["member", "kind", "series", "step", "status"] + names + ["error", "log"])
    for r in rows:
      w.writerow([r["member"], r["kind"], r["series"], "" if r["step"] is None else r["step"],
                  r["status"]] + [r["metrics"].get(n, "") for n in names] +
                 [r["error"], r["log"]])


def _short(name: str) -> str:
  return name[len("eval/"):] if name.startswith("eval/") else name


def markdown(rows, names) -> str:
  """Member x metric table; failed members are listed under it with their error."""
  head = ["member", "step", "status"] + [_short(n) for n in names]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["member"], "" if r["step"] is None else str(r["step"]), r["status"]]
    cells += [f"{r['metrics'][n]:.4f}" if n in r["metrics"] else "" for n in names]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    lines += ["", "Failed members (rerun the sweep to retry them):", ""]
    lines += [f"- `{r['member']}`: {r['error']} (log: `{r['log']}`)" for r in failed]
  return "\n".join(lines) + "\n"


def plot(points, names, path: str, max_panels: int = 12):
  """One panel per metric (the first `max_panels`): value against step, a line per
  series."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = names[:max_panels] or [None]
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  for ax, name in zip(axes.flat, names):
    if name is None:
      ax.text(0.5, 0.5, "no results yet", ha="center", va="center")
      continue
    for series, pts in points.items():
      xy = [(s, m[name]) for s, m in pts if name in m and s is not None]
      if xy:
        ax.plot(*zip(*xy), marker="o", label=series)
    ax.set_title(_short(name))
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_all(workdir: str, metrics_regex: str = "") -> str:
  """Writes results.csv, results.md and results.png in `workdir`; -> the markdown."""
  rows, points, names = collect(workdir, metrics_regex)
  write_csv(rows, names, os.path.join(workdir, "results.csv"))
  md = markdown(rows, names)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  plot(points, names, os.path.join(workdir, "results.png"))
  return md


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="the sweep's --workdir")
  parser.add_argument("--metrics", default="", help="regex: only the metrics it matches")
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, STATUS_FILE)):
    sys.exit(f"error: {args.workdir} has no {STATUS_FILE}; pass the --workdir of a sweep "
             "run by experiments/sweep.py.")
  print(write_all(args.workdir, args.metrics))


if __name__ == "__main__":
  main()
