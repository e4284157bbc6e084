"""Runs a sweep: one `main.py` subprocess per member, in sequence, and collects the
results into one CSV, a markdown table and a plot.

    .venv/bin/python experiments/sweep.py experiments/demo_lr.py --workdir=runs/sweep
    .venv/bin/python experiments/sweep.py experiments/demo_eval.py --workdir=runs/evals
    # --dry_run: print the commands; --report_only: only collect; --metrics=REGEX: the
    # table's and plot's metrics; after `--`: --config.KEY=VALUE for every member.

A sweep file is a Python file defining:

Training sweep (`MODE = "train"`, the default): members are override sets.

    BASE = "configs/demo.py"                     # a main.py --config= value
    SWEEP = [{"optim.lr": lr} for lr in (5e-4, 1e-3)]
    COMMON = {"total_steps": 400}                # optional: overrides of every member

  Member i trains in WORKDIR/<i>-<k=v,...> (resumable like any run); the evaluation
  rows of its metrics.jsonl are collected.

Evaluation sweep (`MODE = "eval"`): members are CHECKPOINTS x EVALS.

    from experiments.sweep import train_sweep
    MODE = "eval"
    BASE = "configs/demo.py"
    CHECKPOINTS = [
        {"workdir": "runs/demo", "steps": "all"},  # or "latest" (default), [200, 800]
        {"name": "other_run", "init_from": {"workdir": "runs/other"}},
        *train_sweep("experiments/demo_lr.py", "runs/sweep"),  # its members' newest
    ]
    EVALS = [
        {"name": "recipe"},                        # the recipe's evaluators as they are
        {"name": "simple", "evals.zeroshot.templates": "('a photo of a {}.',)"},
    ]

  A checkpoint is a trained run's `workdir` with `steps`, or `init_from` (keys of
  `config.init_from`: imported weights or another run's parameters, evaluated as step
  0); `overrides` are the config keys its model was built with beyond BASE (`base`:
  another recipe); `name` defaults to the workdir's name. An eval setting is a dict of
  overrides with a `name`: evaluator options (`evals.NAME.source`, `.templates`,
  `.size`), `data.image_size`, `evals.NAME.every=-1` to turn an evaluator off. Member
  CKPT.stepN.EVAL runs `main.py --mode=eval --step=N --eval_dir=WORKDIR/CKPT.stepN.EVAL`
  (CKPT.init.EVAL for init_from), which writes results.json there.

Bookkeeping: each member's output goes to log.txt in its directory, and its record
(status done / failed, exit code, last error line, log path, command) to
sweep_member.json there and to WORKDIR/status.json. A failing member is recorded and
the sweep goes on (exit status 1 at the end); so is a training run stopped before its
total_steps (SIGTERM; Ctrl-C stops the member, which saves, and then the sweep).
Rerunning skips the members done with the same command and retries (resumes) the
others. After every member, `tools/collect_sweep.py` rewrites WORKDIR/results.csv,
results.md (member x metric) and results.png (each metric against step, one line per
checkpoint x eval setting or training member).
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from tools import collect_sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

MAIN = os.path.join(ROOT, "main.py")  # What each member runs, with its flags.
MEMBER_FILE = "sweep_member.json"
LOG_FILE = "log.txt"


class SweepFileError(ValueError):
  """A mistake in a sweep file (printed without a traceback)."""


class Member(NamedTuple):
  name: str
  kind: str  # 'train' or 'eval'
  series: str  # The plot's line: a training member, or checkpoint x eval setting.
  step: Optional[int]  # The checkpoint step evaluated (None: main.py's newest; 0: init).
  dir: str  # Its directory: the training workdir, or the eval results directory.
  flags: List[str]  # main.py's arguments.


def load(path):
  """The sweep file at `path` as a module."""
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _resolve(path: str) -> str:
  """An absolute path: relative to the current directory if it exists there, else to
  the repository; a recipe's `:arg` suffix is kept."""
  file, colon, arg = path.partition(":")
  if not os.path.isabs(file):
    file = os.path.abspath(file) if os.path.exists(file) else os.path.join(ROOT, file)
  return file + colon + arg


def _flags(overrides: dict) -> List[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _label(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items())


def _safe(name: str) -> str:
  return re.sub(r"[/\\\s]+", "_", name)


def _train_members(sweep, workdir, extra):
  base, common = _resolve(sweep.BASE), getattr(sweep, "COMMON", {})
  out = []
  for i, overrides in enumerate(sweep.SWEEP):
    name = _safe(f"{i}-{_label(overrides)}" if overrides else str(i))
    run_dir = os.path.join(workdir, name)
    flags = [f"--config={base}", f"--workdir={run_dir}"] + _flags(
        {**common, **overrides}) + list(extra)
    out.append(Member(name, "train", name, None, run_dir, flags))
  return out


def saved_steps(workdir: str) -> List[int]:
  """The checkpoint steps in WORKDIR/checkpoints (sorted; [] if none)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(root) if p.isdigit()) \
      if os.path.isdir(root) else []


def _steps(ckpt) -> list:
  """The steps of a checkpoint entry; [None] (main.py's newest) if none is saved yet."""
  if "init_from" in ckpt:
    return [0]
  want, have = ckpt.get("steps", "latest"), saved_steps(_resolve(ckpt["workdir"]))
  if want == "all":
    return have or [None]
  if want == "latest":
    return have[-1:] or [None]
  if isinstance(want, int) or (isinstance(want, (list, tuple)) and
                               all(isinstance(s, int) for s in want)):
    return [want] if isinstance(want, int) else list(want)
  raise SweepFileError(f"steps={want!r} of checkpoint {ckpt}: use 'all', 'latest' or a list "
                   "of steps.")


def _eval_members(sweep, workdir, extra):
  common = getattr(sweep, "COMMON", {})
  evals = getattr(sweep, "EVALS", None) or [{"name": "recipe"}]
  out = []
  for c, ckpt in enumerate(sweep.CHECKPOINTS):
    unknown = set(ckpt) - {"name", "workdir", "steps", "init_from", "overrides", "base"}
    if unknown or ("workdir" in ckpt) == ("init_from" in ckpt):
      raise SweepFileError(f"CHECKPOINTS[{c}] = {ckpt}: give either 'workdir' (with "
                       "'steps') or 'init_from', plus optional 'name', 'overrides', "
                       f"'base'{f'; unknown keys {sorted(unknown)}' if unknown else ''}.")
    ckpt_name = ckpt.get("name") or (os.path.basename(os.path.normpath(ckpt["workdir"]))
                                     if "workdir" in ckpt else f"init_from{c}")
    base = _resolve(ckpt.get("base", sweep.BASE))
    init = {f"init_from.{k}": v for k, v in ckpt.get("init_from", {}).items()}
    for e, ev in enumerate(evals):
      ev = dict(ev)
      eval_name = ev.pop("name", None) or _label(ev) or f"eval{e}"
      for step in _steps(ckpt):
        tag = "init" if "init_from" in ckpt else ("latest" if step is None else f"step{step}")
        name = _safe(f"{ckpt_name}.{tag}.{eval_name}")
        out_dir = os.path.join(workdir, name)
        # An imported model's "workdir" is its results directory (no checkpoints there).
        run_dir = out_dir if "init_from" in ckpt else _resolve(ckpt["workdir"])
        flags = [f"--config={base}", f"--workdir={run_dir}", "--mode=eval",
                 f"--eval_dir={out_dir}"]
        if step is not None and "init_from" not in ckpt:  # Step 0 too (an import's).
          flags.append(f"--step={step}")
        flags += _flags({**common, **ckpt.get("overrides", {}), **init, **ev}) + list(extra)
        out.append(Member(name, "eval", _safe(f"{ckpt_name}.{eval_name}"), step, out_dir,
                          flags))
  return out


def members(sweep, workdir: str, extra=()) -> List[Member]:
  """The members of a loaded sweep file, each with its main.py flags."""
  workdir = os.path.abspath(workdir)
  mode = getattr(sweep, "MODE", "train")
  if mode not in ("train", "eval"):
    raise SweepFileError(f"MODE = {mode!r}: use 'train' or 'eval'.")
  need = ("BASE", "SWEEP") if mode == "train" else ("BASE", "CHECKPOINTS")
  missing = [n for n in need if not hasattr(sweep, n)]
  if missing:
    raise SweepFileError(f"The sweep file defines no {' or '.join(missing)} (a {mode} sweep "
                     "needs " + " and ".join(need) + "; see experiments/sweep.py).")
  out = (_train_members if mode == "train" else _eval_members)(sweep, workdir, extra)
  dupes = sorted({m.name for m in out if [n.name for n in out].count(m.name) > 1})
  if dupes:
    raise SweepFileError(f"Sweep members share names {dupes}: give the checkpoints / eval "
                     "settings distinct 'name's.")
  return out


def train_sweep(sweep_file: str, workdir: str, steps="latest") -> List[dict]:
  """CHECKPOINTS entries for every member of training sweep `sweep_file` run in
  `workdir`: each member's run with its BASE, COMMON and overrides."""
  path = sweep_file if os.path.exists(sweep_file) else os.path.join(ROOT, sweep_file)
  sweep = load(path)
  common = getattr(sweep, "COMMON", {})
  return [{"name": m.name, "workdir": m.dir, "steps": steps, "base": sweep.BASE,
           "overrides": {**common, **o}}
          for m, o in zip(_train_members(sweep, os.path.abspath(workdir), ()), sweep.SWEEP)]


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def unfinished(member: Member) -> str:
  """Why a member that exited with status 0 is not finished ('' if it is): an eval
  member without results.json; a training run stopped (SIGTERM, Ctrl-C) before its
  total_steps, which main.py saves and returns from."""
  if member.kind == "eval":
    found = os.path.exists(os.path.join(member.dir, collect_sweep.RESULTS_FILE))
    return "" if found else f"no {collect_sweep.RESULTS_FILE} written"
  total = (_read_json(os.path.join(member.dir, "config.json")) or {}).get("total_steps")
  last = (saved_steps(member.dir) or [0])[-1]
  if total is None or last < total:
    return (f"stopped at step {last} of {total or '?'} (no final checkpoint); rerun the "
            "sweep to resume it")
  return ""


def is_done(member: Member) -> bool:
  """Finished before with the same command."""
  rec = _read_json(os.path.join(member.dir, MEMBER_FILE)) or {}
  return (rec.get("status") == "done" and rec.get("flags") == member.flags and
          not unfinished(member))


def last_error(log_path: str, since: int = 0) -> str:
  """The last `error: ...` line main.py printed after byte `since`, else the last line
  (a traceback's exception)."""
  with open(log_path, errors="replace") as f:
    f.seek(since)
    lines = [l.strip() for l in f.read()[-65536:].splitlines() if l.strip()]
  errs = [l for l in lines if l.startswith("error:")]
  return ((errs or lines or ["(no output)"])[-1])[:500]


def record(member: Member, status: str, **fields) -> dict:
  """The record of `member` with `status` ('running', 'done', 'failed') that
  member.json and the sweep's status file hold: its name, kind, series, step, dir,
  flags and log path, plus `fields` (returncode, seconds, error)."""
  rec = dict(name=member.name, kind=member.kind, series=member.series, step=member.step,
             dir=member.dir, flags=member.flags, status=status,
             log=os.path.join(member.dir, LOG_FILE), **fields)
  return rec


def run_member(member: Member, python: str = sys.executable) -> dict:
  """Runs one member (its output appended to its log.txt); -> its record."""
  os.makedirs(member.dir, exist_ok=True)
  log = os.path.join(member.dir, LOG_FILE)
  argv = [python, MAIN] + member.flags
  _write_json(os.path.join(member.dir, MEMBER_FILE), record(member, "running"))
  t0 = time.time()
  with open(log, "a") as f:
    start = f.tell()
    f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')}: "
            f"{' '.join(argv)}\n")
    f.flush()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
      code = proc.wait()
    except KeyboardInterrupt:  # The member got the Ctrl-C too: let it save and stop.
      try:
        proc.wait()
      except KeyboardInterrupt:  # A second Ctrl-C: at once.
        proc.kill()
      raise
  fields = dict(returncode=code, seconds=round(time.time() - t0, 1))
  why = unfinished(member) if code == 0 else (
      last_error(log, start) if code > 0 else f"killed by signal {-code}")
  rec = record(member, "failed" if why else "done", error=why, **fields)
  _write_json(os.path.join(member.dir, MEMBER_FILE), rec)
  return rec


def write_status(workdir: str, sweep_file: str, recs: List[dict]):
  """Writes WORKDIR/status.json (atomically): the sweep file and the records
  (`record`) of its members so far, which tools/collect_sweep.py reads."""
  _write_json(os.path.join(workdir, collect_sweep.STATUS_FILE),
              {"sweep_file": sweep_file, "members": recs})


def run(sweep_file: str, workdir: str, extra=(), metrics: str = "", log=print) -> List[dict]:
  """Runs the members not done yet (see the module docstring); -> their records."""
  workdir = os.path.abspath(workdir)
  todo = members(load(sweep_file), workdir, extra)
  os.makedirs(workdir, exist_ok=True)
  recs = [(_read_json(os.path.join(m.dir, MEMBER_FILE)) if is_done(m) else None) or
          record(m, "pending") for m in todo]
  for i, m in enumerate(todo):
    if recs[i]["status"] == "done":
      log(f"[{i + 1}/{len(todo)}] {m.name}: done before, skipped")
      continue
    log(f"[{i + 1}/{len(todo)}] {m.name}: running (log: {recs[i]['log']})")
    try:
      recs[i] = run_member(m)
    except KeyboardInterrupt:
      recs[i] = record(m, "interrupted", error="interrupted")
      write_status(workdir, sweep_file, recs)
      raise
    msg = f"done in {recs[i]['seconds']:.0f}s" if recs[i]["status"] == "done" else \
        f"FAILED (exit {recs[i]['returncode']}): {recs[i]['error']}"
    log(f"[{i + 1}/{len(todo)}] {m.name}: {msg}")
    write_status(workdir, sweep_file, recs)
    collect_sweep.write_all(workdir, metrics)
  write_status(workdir, sweep_file, recs)
  log(collect_sweep.write_all(workdir, metrics))
  return recs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweep_file")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dry_run", action="store_true", help="Only print the commands.")
  parser.add_argument("--report_only", action="store_true",
                      help="Only collect the results already in --workdir.")
  parser.add_argument("--metrics", default="", help="regex: the metrics of the table "
                      "and plot (default: every eval/ metric)")
  parser.epilog = "After '--': --config.KEY=VALUE overrides for every member."
  argv = sys.argv[1:] if argv is None else list(argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  args = parser.parse_args(argv[:len(argv) - len(extra) - ("--" in argv)])
  args.extra = extra
  if not os.path.isfile(args.sweep_file):
    sys.exit(f"error: sweep file not found: {args.sweep_file}")
  try:
    return _main(args)
  except SweepFileError as e:
    sys.exit(f"error: {args.sweep_file}: {e}")


def _main(args):
  if args.dry_run:
    for m in members(load(args.sweep_file), args.workdir, args.extra):
      print(shlex.join([sys.executable, "main.py"] + m.flags))
    return 0
  if args.report_only:
    print(collect_sweep.write_all(args.workdir, args.metrics))
    return 0
  recs = run(args.sweep_file, args.workdir, args.extra, args.metrics)
  failed = [r["name"] for r in recs if r["status"] != "done"]
  if failed:
    print(f"{len(failed)} of {len(recs)} members failed: {failed}; see "
          f"{os.path.join(args.workdir, collect_sweep.STATUS_FILE)}. Rerun to retry them.")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
