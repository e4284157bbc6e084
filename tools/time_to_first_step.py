"""Time to the first training step of a recipe with an empty and with a warm
compilation cache, in fresh processes; prints one JSON object.

    .venv/bin/python tools/time_to_first_step.py --config=configs/demo.py
    .venv/bin/python tools/time_to_first_step.py --config=configs/clip_b16.py \
        --set=batch_size=8 --set=data.source=shapes

Each round uses a new, empty cache directory (VLP_JAX_COMPILATION_CACHE; never the
user's own) and runs `main.py` three times with every evaluator off, each stopped
with SIGTERM once its first step is done (it then saves a checkpoint, as a preempted
run does): 'first' (empty cache, new workdir), 'second' (warm cache, another new
workdir) and 'resumed' (the first workdir again with the same config: restores the
checkpoint, then steps). Each figure is the trainer's "Time to first step" log line:
seconds from the process's start to the end of its first completed step, with its
parts (imports, set-up, state, data + first step). `second_ratio` and
`resumed_ratio` divide the median of each by the median 'first'. The machine's load
average is reported too: the figures are only comparable within one command.
"""
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", None, "Recipe: configs/NAME.py[:arg].")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config overrides "
                                 "(--config.KEY=VALUE of main.py), e.g. batch_size=8.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of (first, second, resumed).")
_KEEP = flags.DEFINE_string("keep", "", "Keep the cache and workdirs under this "
                            "directory (default: a temporary one, removed).")
flags.mark_flags_as_required(["config"])

_LINE = re.compile(r"Time to first step: ([\d.]+)s since the process started \((.*)\)")
_CACHE = re.compile(r"compilation cache: (\d+) programs loaded, (\d+) compiled, "
                    r"(\d+) written")


def eval_names(config_arg: str):
  """The names in `config.evals` of recipe `config_arg` (configs/NAME.py[:arg])."""
  path, _, arg = config_arg.partition(":")
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  return list(config.evals.keys())


def parse(log: str):
  """(seconds, {part: seconds, and the cache's program counts}) of the trainer's
  time-to-first-step line."""
  m = _LINE.search(log)
  if not m:
    raise RuntimeError("No 'Time to first step' line in the run's log:\n" + log[-3000:])
  parts = {}
  for item in m.group(2).split(", "):
    name, _, value = item.rpartition(" ")
    parts[name] = float(value.rstrip("s"))
  c = _CACHE.search(log)
  if c:
    parts.update(zip(("programs loaded", "programs compiled", "programs written"),
                     map(int, c.groups())))
  return float(m.group(1)), parts


def start(config_arg, overrides, workdir, cache):
  """Runs main.py, stopped by SIGTERM after its first step; -> (time to first step,
  parts, process seconds)."""
  argv = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config_arg}",
          f"--workdir={workdir}", "--config.plot=False"
          ] + [f"--config.{o}" for o in overrides]
  env = dict(os.environ, VLP_JAX_COMPILATION_CACHE=cache)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  t0 = time.time()
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if _LINE.search(line):
      proc.send_signal(signal.SIGTERM)  # Stops after this step, with a checkpoint.
  proc.wait()
  wall = time.time() - t0
  log = "".join(lines)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{log[-3000:]}")
  seconds, parts = parse(log)
  return seconds, parts, wall


def cache_size(cache):
  files = [f for f in os.listdir(cache) if f.endswith("-cache")]
  return len(files), sum(os.path.getsize(os.path.join(cache, f)) for f in files)


def measure(config_arg, overrides, rounds, base):
  # Many steps (the recipe's total_steps, unless overridden): stopped after the first.
  off = [f"evals.{n}.every=-1" for n in eval_names(config_arg)]
  runs = {"first": [], "second": [], "resumed": []}
  parts, entries = {}, None
  for r in range(rounds):
    cache = os.path.join(base, f"cache{r}")
    for kind, workdir in (("first", "w_first"), ("second", "w_second"),
                          ("resumed", "w_first")):
      seconds, parts[kind], wall = start(config_arg, overrides + off,
                                         os.path.join(base, f"{workdir}{r}"), cache)
      runs[kind].append(round(seconds, 2))
      print(f"round {r} {kind}: {seconds:.1f}s to first step ({wall:.1f}s process)",
            file=sys.stderr, flush=True)
      if kind == "first":
        entries = cache_size(cache)
  med = {k: statistics.median(v) for k, v in runs.items()}
  return {"config": config_arg, "overrides": overrides, "seconds": runs,
          "median": med, "second_ratio": round(med["second"] / med["first"], 3),
          "resumed_ratio": round(med["resumed"] / med["first"], 3),
          "parts_last_round": parts, "cache_entries": entries[0],
          "cache_bytes": entries[1]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  load_before = os.getloadavg()
  if _KEEP.value:
    os.makedirs(_KEEP.value, exist_ok=True)
    result = measure(_CONFIG.value, list(_SET.value), _ROUNDS.value, _KEEP.value)
  else:
    with tempfile.TemporaryDirectory(prefix="vlp_jax_ttfs_") as base:
      result = measure(_CONFIG.value, list(_SET.value), _ROUNDS.value, base)
  result["loadavg_before_after"] = [round(load_before[0], 2),
                                    round(os.getloadavg()[0], 2)]
  result["cpus"] = os.cpu_count()
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
