"""Method comparison on the built-in benchmark: every method x seeds, one results table.

    .venv/bin/python experiments/methods.py --workdir=runs/methods          # all
    .venv/bin/python experiments/methods.py --workdir=runs/methods --methods=clip,filip \
        --seeds=0,1,2

Each method is a set of overrides of `BASE` (the tiny benchmark recipe); each run is a
plain `main.py` run in WORKDIR/METHOD/seedS (rerunning skips finished runs, and an
interrupted one resumes like any run). At the end the script reads every run's
`metrics.jsonl` and writes WORKDIR/results.md (a markdown table: mean +- sample std
over seeds of zero-shot top-1 and image->text / text->image R@1 at the final step,
and the median training step time relative to `clip` measured in the same command)
and WORKDIR/results.json (per run figures).

Later method families extend `METHODS` (name -> Method); the baseline is `clip`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

BASE = "configs/bench.py"
BASELINE = "clip"
# (column title, metrics.jsonl key) of the final evaluation.
COLUMNS = (("zero-shot top-1", "eval/zeroshot/top1"),
           ("I->T R@1", "eval/retrieval/i2t_r1"),
           ("T->I R@1", "eval/retrieval/t2i_r1"))


class Method(NamedTuple):
  paper: str
  overrides: Dict[str, object]
  note: str = ""
  config_arg: str = ""  # `configs/bench.py:ARG` (settings overrides cannot express).


# The classification view and the caption view of the benchmark data, for methods
# that train on a mixture of classification and caption data.
MIXTURE = "(('shapes:hard,classes', 0.5), ('shapes:hard', 0.5))"

METHODS: Dict[str, Method] = {
    "clip": Method("Radford et al. 2021", {}),
    "filip": Method("Yao et al. 2021", {"objectives": "{'filip': 1.0}",
                                         "model.token_embed_dim": 32}),
    "clip_softneg": Method("Gao et al. 2022 (PyramidCLIP's softened negatives)",
                           {"objective_cfg": "{'clip': {'negative_smoothing': 0.2}}"}),
    "lightclip": Method("Nie et al. 2023 (progressive soft labels)",
                        {"objectives": "{'lightclip': 1.0}",
                         # The softening ramps over the whole run (bench: 300 steps).
                         "objective_cfg": "{'lightclip': {'ramp_steps': 300}}"}),
    "clip_mix": Method("CLIP on the classification + caption mixture",
                       {"data.mixture": MIXTURE},
                       "baseline for the two below: same data"),
    "unicl": Method("Yang et al. 2022", {"objectives": "{'unicl': 1.0}",
                                          "data.mixture": MIXTURE}),
    "unicl_prefix": Method("Saito et al. 2022 (prefix conditioning) on UniCL",
                           {"objectives": "{'unicl': 1.0}", "data.mixture": MIXTURE,
                            "model.text.prefix_conditioning": True}),
    # Issue 15: views, momentum teachers, queues, masked modelling.
    "tcl": Method("Yang et al. 2022 (contrastive part)", {}, config_arg="tcl"),
    "pyramidclip": Method("Gao et al. 2022 (two-level pyramid)", {},
                          config_arg="pyramidclip"),
    "siglip2": Method("Tschannen et al. 2025 (SigLIP 2-style)", {},
                      config_arg="siglip2"),
    "m3ae": Method("Geng et al. 2022 (+ contrastive head)", {}, config_arg="m3ae"),
    # Issue 16: token reduction inside the ViT, at patch 8 (64 tokens); `clip_p8` is
    # their baseline (same patch size, no reduction).
    "clip_p8": Method("CLIP at patch 8 (64 patch tokens)", {},
                      "baseline for tome / evit", config_arg="p8"),
    "tome": Method("Bolya et al. 2023 (ToMe, r=12 per block)", {}, config_arg="tome"),
    "evit": Method("Liang et al. 2022 (EViT, keep 0.5 after blocks 1, 2, fused)", {},
                   config_arg="evit"),
}


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, method, f"seed{seed}")


def command(workdir: str, method: str, seed: int, extra=()) -> list:
  """The main.py argv of one run."""
  overrides = dict(METHODS[method].overrides, seed=seed)
  arg = METHODS[method].config_arg
  argv = [sys.executable, os.path.join(ROOT, "main.py"),
          f"--config={BASE}" + (f":{arg}" if arg else ""),
          f"--workdir={run_dir(workdir, method, seed)}"]
  argv += [f"--config.{k}={v}" for k, v in overrides.items()]
  return argv + list(extra)


def read_rows(path: str):
  from vlp_jax.train import metric_writer  # pylint: disable=g-import-not-at-top
  return metric_writer.read_metrics(path) if os.path.exists(path) else []


def final_values(rows, keys) -> Dict[str, float]:
  """{key: its last float value in `rows`} for the `keys` that have one."""
  out = {}
  for key in keys:
    values = [r[key] for r in rows if isinstance(r.get(key), float)]
    if values:
      out[key] = values[-1]
  return out


def summarize_run(path: str) -> Dict[str, float]:
  """Final eval metrics and median steps/s (first log interval, with compilation,
  left out) of one run's metrics.jsonl; {} if it has no final evaluation."""
  rows = read_rows(path)
  out = final_values(rows, [key for _, key in COLUMNS])
  speeds = [r["steps_per_sec"] for r in rows if isinstance(r.get("steps_per_sec"), float)]
  if len(speeds) > 1:
    speeds = speeds[1:]
  if speeds:
    out["steps_per_sec"] = statistics.median(speeds)
  return out if all(k in out for _, k in COLUMNS) else {}


def mean_std(values) -> Tuple[float, float]:
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: Dict[str, Dict[int, Dict[str, float]]]) -> str:
  """Markdown table of mean +- std over seeds; step time relative to the baseline."""
  base = [r["steps_per_sec"] for r in results.get(BASELINE, {}).values()
          if "steps_per_sec" in r]
  base_speed = statistics.mean(base) if base else None
  head = ["method", "paper", "seeds"] + [c for c, _ in COLUMNS] + [
      f"step time vs {BASELINE}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, runs in results.items():
    done = [r for r in runs.values() if r]
    if not done:
      continue
    cells = [name, METHODS[name].paper, str(len(done))]
    for _, key in COLUMNS:
      m, s = mean_std([r[key] for r in done])
      cells.append(f"{m:.3f} ± {s:.3f}")
    speeds = [r["steps_per_sec"] for r in done if "steps_per_sec" in r]
    cells.append(f"{base_speed / statistics.mean(speeds):.2f}x"
                 if base_speed and speeds else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of {list(METHODS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--dry_run", action="store_true", help="Only print the commands.")
  parser.add_argument("--report_only", action="store_true",
                      help="Only summarise the runs already in --workdir.")
  parser.add_argument("extra", nargs="*", help="more --config.KEY=VALUE overrides for "
                      "every run (after '--'), e.g. -- --config.total_steps=100")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  results = {}
  for method in methods:
    results[method] = {}
    for seed in seeds:
      path = os.path.join(run_dir(args.workdir, method, seed), "metrics.jsonl")
      summary = summarize_run(path)
      if not summary and not args.report_only:
        argv_ = command(args.workdir, method, seed, args.extra)
        print(" ".join(argv_), flush=True)
        if args.dry_run:
          continue
        proc = subprocess.run(argv_, cwd=ROOT, check=False)
        if proc.returncode:
          print(f"{method} seed {seed} failed (exit {proc.returncode}); see "
                f"{run_dir(args.workdir, method, seed)}", flush=True)
        summary = summarize_run(path)
      results[method][seed] = summary
  if args.dry_run:
    return
  os.makedirs(args.workdir, exist_ok=True)
  md = table(results)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  print(md)


if __name__ == "__main__":
  main()
