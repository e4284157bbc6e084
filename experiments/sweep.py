"""Runs a sweep: one `main.py` training run per set of config overrides, in sequence.

    .venv/bin/python experiments/sweep.py experiments/demo_lr.py --workdir=runs/sweep

A sweep file defines `BASE` (a `main.py --config=` value) and `SWEEP`, a list of
dicts of overrides; each run gets `WORKDIR/<index>-<k=v,...>` and is resumable like
any run (rerun the sweep to continue interrupted members).
"""
import argparse
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
  spec = importlib.util.spec_from_file_location("sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def commands(sweep_file, workdir):
  """[(run_workdir, argv)] for every member of the sweep."""
  sweep = load(sweep_file)
  out = []
  for i, overrides in enumerate(sweep.SWEEP):
    name = f"{i}-" + ",".join(f"{k}={v}" for k, v in overrides.items())
    run_dir = os.path.join(workdir, name.replace("/", "_"))
    argv = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={sweep.BASE}",
            f"--workdir={run_dir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    out.append((run_dir, argv))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweep_file")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dry_run", action="store_true", help="Only print the commands.")
  args = parser.parse_args()
  for run_dir, argv in commands(args.sweep_file, args.workdir):
    print(" ".join(argv), flush=True)
    if not args.dry_run:
      subprocess.run(argv, cwd=ROOT, check=True)


if __name__ == "__main__":
  main()
