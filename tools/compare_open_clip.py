"""vlp_jax's train step side by side with open_clip's (PyTorch eager), same model and batch.

    python tools/compare_open_clip.py --torch_python=/tmp/ocvenv/bin/python \\
        --batch_size=8 --rounds=3

The small CPU model (README "Performance"), whose open_clip form is a custom model
config:

    python tools/compare_open_clip.py --torch_python=/tmp/ocvenv/bin/python \\
        --config=configs/clip_b16.py:small --open_clip_model_json=tools/open_clip_small_cpu.json \\
        --batch_size=64 --rounds=3

`--torch_python` is an interpreter with torch and open_clip_torch installed (see
tools/benchmark_open_clip.py); vlp_jax runs under this interpreter. Each round runs
tools/benchmark.py on --config and tools/benchmark_open_clip.py on --open_clip_model,
one after the other in fresh processes (order alternating between rounds, so slow
drift of the machine's load hits both), and the ratio is taken within the round.
Prints a markdown table and, with --json_out, every record.
"""
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_PYTHON = flags.DEFINE_string("torch_python", None,
                                    "Python with torch and open_clip_torch installed.")
_CONFIG = flags.DEFINE_string("config", "configs/clip_b16.py", "vlp_jax recipe.")
_OPEN_CLIP_MODEL = flags.DEFINE_string("open_clip_model", "ViT-B-16",
                                       "The same architecture in open_clip.")
_OPEN_CLIP_JSON = flags.DEFINE_string(
    "open_clip_model_json", "", "An open_clip model config file (embed_dim, vision_cfg, "
    "text_cfg) for an architecture open_clip does not ship; replaces --open_clip_model.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch for both.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype for both (open_clip: autocast).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round and framework.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; each runs both frameworks.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write all records here.")
flags.mark_flags_as_required(["torch_python"])


def last_json_line(text: str) -> dict:
  """The last line of `text` that parses as a JSON object."""
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  raise ValueError(f"No JSON record in the output:\n{text[-2000:]}")


def commands(torch_python, config, model, batch, dtype, steps, model_json="") -> dict:
  """The two benchmark command lines, by framework name. `model_json`: an open_clip
  model config file used instead of the named `model`."""
  model_arg = f"--model_json={model_json}" if model_json else f"--model={model}"
  return {
      "vlp_jax": [sys.executable, os.path.join(_HERE, "benchmark.py"),
                  f"--config={config}", f"--config.batch_size={batch}",
                  f"--config.model.dtype={dtype}", f"--steps={steps}", "--warmup=1"],
      "open_clip": [torch_python, os.path.join(_HERE, "benchmark_open_clip.py"),
                    model_arg, f"--batch_size={batch}", f"--dtype={dtype}",
                    f"--steps={steps}", "--warmup=1"],
  }


def run_one(cmd) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return last_json_line(proc.stdout)


def summarize(rounds) -> dict:
  """rounds: [{'vlp_jax': record, 'open_clip': record}, ...] -> per-round and median
  speed-ups (open_clip step time / vlp_jax step time; > 1: vlp_jax is faster)."""
  per_round = [r["open_clip"]["step_time_s"]["median"] / r["vlp_jax"]["step_time_s"]["median"]
               for r in rounds]
  med = lambda name: float(np.median([r[name]["step_time_s"]["median"] for r in rounds]))
  return {"speedup_per_round": per_round, "speedup_median": float(np.median(per_round)),
          "vlp_jax_step_s": med("vlp_jax"), "open_clip_step_s": med("open_clip"),
          "vlp_jax_params": rounds[0]["vlp_jax"].get("num_params"),
          "open_clip_params": rounds[0]["open_clip"].get("num_params")}


def table(summary, batch, dtype) -> str:
  s = summary
  return "\n".join([
      f"| framework | step (s), batch {batch}, {dtype} | samples/s | params |",
      "|---|---|---|---|",
      f"| open_clip (PyTorch eager) | {s['open_clip_step_s']:.3f} | "
      f"{batch / s['open_clip_step_s']:.2f} | {s['open_clip_params']:,} |",
      f"| vlp_jax | {s['vlp_jax_step_s']:.3f} | {batch / s['vlp_jax_step_s']:.2f} | "
      f"{s['vlp_jax_params']:,} |",
      "",
      f"vlp_jax speed-up: {s['speedup_median']:.2f}x (per round: "
      + ", ".join(f"{r:.2f}x" for r in s["speedup_per_round"]) + ")",
  ])


def run_rounds(cmds, num_rounds: int) -> list:
  """Runs both commands `num_rounds` times, alternating which goes first."""
  rounds = []
  for i in range(num_rounds):
    order = ["vlp_jax", "open_clip"] if i % 2 == 0 else ["open_clip", "vlp_jax"]
    rec = {}
    for name in order:
      rec[name] = run_one(cmds[name])
      print(f"round {i + 1} {name}: {rec[name]['step_time_s']['median']:.3f} s/step",
            file=sys.stderr, flush=True)
    rounds.append(rec)
  return rounds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _OPEN_CLIP_JSON.value and not os.path.isfile(_OPEN_CLIP_JSON.value):
    raise app.UsageError(f"--open_clip_model_json={_OPEN_CLIP_JSON.value} does not "
                         "exist; give an open_clip model config file.")
  cmds = commands(_TORCH_PYTHON.value, _CONFIG.value, _OPEN_CLIP_MODEL.value,
                  _BATCH.value, _DTYPE.value, _STEPS.value, _OPEN_CLIP_JSON.value)
  rounds = run_rounds(cmds, _ROUNDS.value)
  summary = summarize(rounds)
  print(table(summary, _BATCH.value, _DTYPE.value))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"summary": summary, "rounds": rounds}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  app.run(main)
