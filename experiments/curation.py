"""Curation experiment: train on noisy captions, curate to half, train again.

    .venv/bin/python experiments/curation.py --workdir=runs/curation --seeds=0,1,2

Per seed, on the benchmark (configs/bench.py) with `shapes:hard,noisy=NOISE` (the
captions of a seeded NOISE share of the --train_size records shuffled among them):

  noisy     trains on all --train_size noisy records
  curated   tools/curate.py with the noisy run's model (--curate_flags, default: the
            top 70% by image-caption similarity, then half of all records in equal
            shares of 64 k-means clusters, highest scores first), then trains on the
            kept records (`index:` source), the same number of steps
  random    (with --arms=...,random) a seeded random half, the same steps: what
            curation gains over subsetting alone
  clean     (with --arms=...,clean) all records without noise (the ceiling)

Each run is a plain main.py run in WORKDIR/ARM/seedS (rerunning skips finished runs
and curations). Writes WORKDIR/results.md and results.json: zero-shot top-1 on the
clean test split (and held-out pairs) per arm, mean +- std over seeds, and the
curation's precision / recall against the known corrupted records. Extra
--config.KEY=VALUE overrides after '--' go to every training run (e.g. a short
smoke run: -- --config.total_steps=20).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import methods  # pylint: disable=g-import-not-at-top,wrong-import-position

BASE = "configs/bench.py"
ARMS = ("noisy", "curated", "random", "clean")
COLUMNS = (("zero-shot top-1", "eval/zeroshot/top1"),
           ("held-out top-1", "eval/zeroshot_heldout/top1"))
DEFAULT_CURATE = ("--keep_fraction=0.7 --clusters=64 --balance_fraction=0.5 "
                  "--within_cluster=score")


def noisy_source(noise: float) -> str:
  return f"shapes:hard+noisy={noise:g}"


def run_dir(workdir, arm, seed):
  return os.path.join(workdir, arm, f"seed{seed}")


def index_path(workdir, arm, seed):
  return os.path.join(workdir, "index", arm, f"seed{seed}", "index.json")


def train_command(args, arm, seed, source):
  return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={BASE}",
          f"--workdir={run_dir(args.workdir, arm, seed)}", f"--config.seed={seed}",
          f"--config.data.source={source}", f"--config.data.size={args.train_size}",
          ] + list(args.extra)


def curate_command(args, seed):
  out = os.path.dirname(index_path(args.workdir, "curated", seed))
  return [sys.executable, os.path.join(ROOT, "tools", "curate.py"),
          f"--workdir={run_dir(args.workdir, 'noisy', seed)}", f"--out={out}",
          f"--seed={seed}"] + args.curate_flags.split()


def write_random_half(args, seed):
  """A seeded random half of the noisy records as an index file (the control)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import sources_index  # pylint: disable=g-import-not-at-top
  n = args.train_size
  rng = np.random.default_rng([seed, 12345])
  keep = np.sort(rng.permutation(n)[:n // 2])
  # overwrite: the same seed always writes the same indices.
  return sources_index.write_index(index_path(args.workdir, "random", seed), keep,
                                   noisy_source(args.noise), "train", n, seed,
                                   overwrite=True,
                                   rules=[{"rule": "random_half", "in": n,
                                           "out": len(keep)}])


def final_metrics(workdir):
  rows = methods.read_rows(os.path.join(workdir, "metrics.jsonl"))
  return methods.final_values(rows, [key for _, key in COLUMNS])


def _run(argv, dry_run):
  print(" ".join(argv), flush=True)
  if dry_run:
    return 0
  return subprocess.run(argv, cwd=ROOT, check=False).returncode


def run_seed(args, seed):
  """Runs the missing parts of one seed; -> {arm: metrics, 'curation': {...}}."""
  out = {}
  noisy = noisy_source(args.noise)
  sources = {"noisy": noisy, "clean": "shapes:hard",
             "curated": "index:" + index_path(args.workdir, "curated", seed),
             "random": "index:" + index_path(args.workdir, "random", seed)}
  for arm in args.arms:
    if arm == "curated":
      if not os.path.exists(index_path(args.workdir, "curated", seed)):
        if not out.get("noisy") and not args.dry_run:
          print(f"seed {seed}: no finished noisy run to curate with.", flush=True)
          continue
        if _run(curate_command(args, seed), args.dry_run):
          print(f"seed {seed}: curation failed.", flush=True)
          continue
      report = os.path.join(os.path.dirname(index_path(args.workdir, "curated", seed)),
                            "report", "counts.json")
      if os.path.exists(report):
        with open(report) as f:
          out["curation"] = json.load(f).get("corruption", {})
    if arm == "random" and not args.dry_run:
      write_random_half(args, seed)
    wd = run_dir(args.workdir, arm, seed)
    metrics = final_metrics(wd)
    if not metrics:
      code = _run(train_command(args, arm, seed, sources[arm]), args.dry_run)
      if code:
        print(f"{arm} seed {seed} failed (exit {code}); see {wd}", flush=True)
      metrics = final_metrics(wd)
    out[arm] = metrics
  return out


def table(results, args) -> str:
  head = ["training data", "records", "seeds"] + [c for c, _ in COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  sizes = {"noisy": args.train_size, "clean": args.train_size,
           "random": args.train_size // 2, "curated": None}
  names = {"noisy": f"all, {args.noise:.0%} captions shuffled",
           "curated": "curated (tools/curate.py)", "random": "random half",
           "clean": "all, clean captions"}
  for arm in args.arms:
    done = [r[arm] for r in results.values() if r.get(arm)]
    if not done:
      continue
    removed = [r["curation"]["removed"] for r in results.values() if r.get("curation")]
    records = sizes[arm] if sizes[arm] is not None else (  # Mean over the seeds.
        f"{args.train_size - statistics.mean(removed):g}" if removed else "?")
    cells = [names[arm], str(records), str(len(done))]
    for _, key in COLUMNS:
      vals = [r[key] for r in done if key in r]
      cells.append("{:.3f} ± {:.3f}".format(*methods.mean_std(vals)) if vals else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  cur = [r["curation"] for r in results.values() if r.get("curation")]
  if cur:
    p = methods.mean_std([c["precision"] for c in cur])
    r = methods.mean_std([c["recall"] for c in cur])
    k = methods.mean_std([c["kept_corrupted_fraction"] for c in cur])
    lines += ["", f"Curation against the known corruption ({len(cur)} seeds): "
              f"precision {p[0]:.3f} ± {p[1]:.3f} (corrupted share of the removed "
              f"records), recall {r[0]:.3f} ± {r[1]:.3f} (removed share of the "
              f"corrupted records); corrupted share of the kept records "
              f"{k[0]:.3f} ± {k[1]:.3f} (before: {args.noise:.3f})."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--noise", type=float, default=0.3,
                      help="share of the records whose captions are shuffled")
  parser.add_argument("--train_size", type=int, default=20000,
                      help="records of the training set (bench: 300 steps x 128)")
  parser.add_argument("--arms", default="noisy,curated",
                      help=f"comma-separated subset of {list(ARMS)} (in this order)")
  parser.add_argument("--curate_flags", default=DEFAULT_CURATE,
                      help="tools/curate.py flags of the curated arm")
  parser.add_argument("--dry_run", action="store_true", help="Only print the commands.")
  parser.add_argument("extra", nargs="*", help="--config.KEY=VALUE overrides for every "
                      "training run (after '--')")
  args = parser.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
  if "curated" in arms and "noisy" not in arms:
    parser.error("the curated arm curates with the noisy run's model: include 'noisy'")
  args.arms = [a for a in ARMS if a in arms]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  results = {seed: run_seed(args, seed) for seed in seeds}
  if args.dry_run:
    return
  md = table(results, args)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({str(k): v for k, v in results.items()}, f, indent=1, sort_keys=True)
  print(md)


if __name__ == "__main__":
  main()
