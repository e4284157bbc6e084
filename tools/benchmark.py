"""Times the real train step of a config and prints one JSON object.

    python tools/benchmark.py --config=configs/clip_b16.py --config.batch_size=8
    python tools/benchmark.py --config=configs/demo.py --steps=48 --with_data \
        --config.data.source=jsonl:/tmp/bench_data/train.jsonl   # tools/make_bench_data.py
    python tools/benchmark.py --config=configs/clip_b16.py --tower=image
    python tools/benchmark.py --config=configs/clip_b16.py --profile_dir=/tmp/prof

Synthetic device-resident batches (input excluded) unless --with_data, which compares
them with real batches of config.data.source on the same compiled step (alternated
rounds) and times the host pipeline alone. See README, "Performance", for the fields.
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: configs/NAME.py[:arg].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steady-state steps (>= 1).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_WITH_DATA = flags.DEFINE_bool(
    "with_data", False, "Also time the real input pipeline: rounds of synthetic steps, "
    "real-data steps (same compiled step) and the pipeline alone, alternated; "
    "record['data'] holds their samples/s and the real / synthetic step-time ratio.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "--with_data: alternated rounds (>= 1); "
                               "--steps are split between them.")
_TOWER = flags.DEFINE_enum(
    "tower", "", ["", "image", "text"],
    "Time one tower's forward + backward alone instead of the train step.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "After timing, trace --profile_steps more steps here and "
    "summarise where the time goes (summary.md; tools/profile_summary.py).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0,
                                        "Split the CPU into this many devices.")
flags.mark_flags_as_required(["config"])


def overrides(argv):
  return {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[1] if "=" in a else True
          for a in argv if a.startswith("--config.")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _STEPS.value < 1:
    raise app.UsageError("--steps must be >= 1.")
  if _ROUNDS.value < 1:
    raise app.UsageError("--rounds must be >= 1.")
  if _TOWER.value and _WITH_DATA.value:
    raise app.UsageError("--tower times synthetic batches; drop --with_data.")
  import jax  # pylint: disable=g-import-not-at-top
  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  from vlp_jax import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(config)  # A second benchmark of the same shapes loads its programs.
  if not _WITH_DATA.value:
    config.unlock()
    config.evals = {}  # evaluators read data; a benchmark never runs them
  record = benchmark.run(config, steps=_STEPS.value, warmup=_WARMUP.value,
                         with_data=_WITH_DATA.value, tower=_TOWER.value,
                         profile_dir=_PROFILE_DIR.value,
                         profile_steps=_PROFILE_STEPS.value, rounds=_ROUNDS.value)
  record["config"] = _CONFIG_SPEC
  record["overrides"] = overrides(_ARGV)
  # With a warm cache compile_s is the load time: these program counts say which.
  record["compilation_cache"] = compile_cache.counts()
  print(json.dumps(record, sort_keys=True))


_ARGV = sys.argv
_CONFIG_SPEC = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                    None)

if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_check)
