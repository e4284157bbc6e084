"""Each speed switch on/off for one recipe, as ratios to a baseline from the same run.

    python tools/benchmark_features.py --config=configs/demo.py
    python tools/benchmark_features.py --config=configs/clip_b16.py --config.batch_size=8 \\
        --steps=3 --repeats=1
    python tools/benchmark_features.py --config=configs/clip_b16.py --tower=image \\
        --variants=patch_dropout_0.5   # one tower's forward + backward alone

Prints a markdown table (and, with --json_out, the full records). The baseline runs
first and last; ratios use the mean of its two medians, and the spread between them
is printed as a measure of the machine's noise.
"""
import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: configs/NAME.py[:arg].",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timing rounds per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_VARIANTS = flags.DEFINE_list("variants", None, "Subset of variant names (default: all).")
_TOWER = flags.DEFINE_enum(
    "tower", "", ["", "image", "text"],
    "Time one tower's forward + backward alone instead of the train step.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write the records here as JSON.")
_INTERLEAVE = flags.DEFINE_bool(
    "interleave", True, "Compile every variant first, then time them round-robin, one "
    "round at a time (robust to load drift; keeps all variants' states in memory). "
    "Off: one variant after another, the baseline first and last.")
flags.mark_flags_as_required(["config"])

# name -> config overrides (paths under `config.`).
VARIANTS = {
    "bf16": {"model.dtype": "bfloat16"},
    "scan": {"model.scan_layers": True},
    "remat_full": {"model.remat": "full"},
    "scan+remat_dots": {"model.scan_layers": True, "model.remat": "dots_saveable"},
    "fused_qkv": {"model.fused_qkv": True},
    "patch_dropout_0.5": {"model.image.patch_dropout": 0.5},
    "fused+patch_dropout_0.5": {"model.fused_qkv": True, "model.image.patch_dropout": 0.5},
    "xla_attention": {"model.attention_impl": "xla"},
}


def _apply(config, overrides):
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    *parents, key = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[key] = value
  config.evals = {}
  return config


def _bench(config):
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  if _TOWER.value:
    return benchmark.TowerBenchmark(config, _TOWER.value)
  return benchmark.StepBenchmark(config)


def measure(config, name):
  bench = _bench(config)
  bench.time(_WARMUP.value)
  rounds = [bench.time(_STEPS.value) for _ in range(_REPEATS.value)]
  rec = bench.record([t for r in rounds for t in r])
  rec["round_medians_s"] = [float(np.median(r)) for r in rounds]
  rec["variant"] = name
  print(f"{name}: {rec['step_time_s']['median']:.4f} s/step, compile "
        f"{rec['compile_s']:.1f} s", file=sys.stderr, flush=True)
  return rec


def interleaved(configs):
  """Round-robin timing; ratios are per round against that round's baseline."""
  benches = {}
  for name, config in configs.items():
    benches[name] = _bench(config)
    benches[name].time(_WARMUP.value)
    print(f"{name}: compiled in {benches[name].compile_s:.1f} s", file=sys.stderr,
          flush=True)
  rounds = {name: [] for name in configs}
  for _ in range(_REPEATS.value):
    for name, bench in benches.items():
      rounds[name].append(bench.time(_STEPS.value))
  records = []
  for name, bench in benches.items():
    rec = bench.record([t for r in rounds[name] for t in r])
    rec["variant"] = name
    rec["round_medians_s"] = [float(np.median(r)) for r in rounds[name]]
    rec["speedup_per_round"] = [
        float(np.median(b) / np.median(r)) for b, r in zip(rounds["baseline"],
                                                            rounds[name])]
    records.append(rec)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  base = _CONFIG.value
  names = _VARIANTS.value or list(VARIANTS)
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"Unknown variants {sorted(unknown)}; known: {list(VARIANTS)}.")
  spec = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--config="))
  extra = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
  if _INTERLEAVE.value:
    configs = {"baseline": _apply(base, {})}
    configs.update({n: _apply(base, VARIANTS[n]) for n in names})
    records = interleaved(configs)
    speed = lambda r: float(np.median(r["speedup_per_round"]))
    spread = lambda r: (f"{min(r['speedup_per_round']):.2f}-"
                        f"{max(r['speedup_per_round']):.2f}")
    note = "round-robin; speed = median over rounds of baseline/variant step time"
  else:
    records = [measure(_apply(base, {}), "baseline")]
    records += [measure(_apply(base, VARIANTS[n]), n) for n in names]
    records.append(measure(_apply(base, {}), "baseline (again)"))
    b0, b1 = records[0]["step_time_s"]["median"], records[-1]["step_time_s"]["median"]
    base_s = (b0 + b1) / 2
    speed = lambda r: base_s / r["step_time_s"]["median"]
    spread = lambda r: "-"
    note = (f"sequential; baseline first and last, which differ by "
            f"{abs(b0 - b1) / base_s:.1%}")
  what = f"{_TOWER.value} tower forward + backward" if _TOWER.value else "train step"
  print(f"\n{spec} {extra}: {what} (batch {base.batch_size}, {records[0]['device_kind']}, "
        f"{_REPEATS.value} x {_STEPS.value} timed steps per variant; {note})\n")
  print("| variant | step s (median) | samples/s | speed vs baseline | per-round range | "
        "compile s | compile vs baseline | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for r in records:
    s = r["step_time_s"]["median"]
    print(f"| {r['variant']} | {s:.4f} | {r['samples_per_s']:.1f} | {speed(r):.2f}x | "
          f"{spread(r)} | {r['compile_s']:.1f} | "
          f"{r['compile_s'] / records[0]['compile_s']:.2f}x | {r['mfu']:.1%} |")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_check)
