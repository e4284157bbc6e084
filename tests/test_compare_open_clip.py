"""tools/compare_open_clip.py (driver) and tools/benchmark_open_clip.py (torch side)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import compare_open_clip  # pylint: disable=wrong-import-position


def _fake(step_s, params, noise=""):
  """A command that prints log noise and then a benchmark-style JSON record."""
  rec = {"step_time_s": {"median": step_s}, "num_params": params}
  return [sys.executable, "-c", f"print({noise!r}); print({json.dumps(rec)!r})"]


def test_rounds_alternate_and_ratios_are_taken_within_each_round():
  cmds = {"vlp_jax": _fake(2.0, 10, "compiling..."), "open_clip": _fake(5.0, 11)}
  rounds = compare_open_clip.run_rounds(cmds, 3)
  assert len(rounds) == 3
  assert list(rounds[0]) == ["vlp_jax", "open_clip"]
  assert list(rounds[1]) == ["open_clip", "vlp_jax"]
  s = compare_open_clip.summarize(rounds)
  assert s["speedup_per_round"] == [2.5, 2.5, 2.5] and s["speedup_median"] == 2.5
  assert (s["vlp_jax_params"], s["open_clip_params"]) == (10, 11)
  text = compare_open_clip.table(s, 8, "float32")
  assert "| vlp_jax | 2.000 | 4.00 | 10 |" in text and "2.50x" in text


def test_summary_is_the_median_of_per_round_ratios():
  rec = lambda t: {"step_time_s": {"median": t}}
  rounds = [{"vlp_jax": rec(1.0), "open_clip": rec(3.0)},
            {"vlp_jax": rec(2.0), "open_clip": rec(2.0)},
            {"vlp_jax": rec(1.0), "open_clip": rec(2.0)}]
  s = compare_open_clip.summarize(rounds)
  assert s["speedup_per_round"] == [3.0, 1.0, 2.0] and s["speedup_median"] == 2.0


def test_a_failing_benchmark_names_its_command():
  cmds = {"vlp_jax": [sys.executable, "-c", "import sys; sys.exit('boom')"],
          "open_clip": _fake(1.0, 1)}
  with pytest.raises(RuntimeError, match="boom"):
    compare_open_clip.run_rounds(cmds, 1)
  with pytest.raises(ValueError, match="No JSON record"):
    compare_open_clip.last_json_line("no record here\n{not json")


def test_commands_describe_the_same_model_and_batch():
  cmds = compare_open_clip.commands("/x/python", "configs/clip_b16.py", "ViT-B-16", 8,
                                    "float32", 5)
  assert "--config.batch_size=8" in cmds["vlp_jax"]
  assert "--config.model.dtype=float32" in cmds["vlp_jax"]
  assert cmds["open_clip"][0] == "/x/python"
  assert {"--model=ViT-B-16", "--batch_size=8", "--dtype=float32"} <= set(cmds["open_clip"])


def test_open_clip_side_runs_where_torch_is_installed():
  # torch and open_clip_torch are not vlp_jax dependencies: this runs only where
  # VLP_TORCH_PYTHON names an interpreter that has them (skipped in CI).
  python = os.environ.get("VLP_TORCH_PYTHON")
  if not python:
    pytest.skip("set VLP_TORCH_PYTHON to a python with torch and open_clip_torch")
  proc = subprocess.run(
      [python, os.path.join(REPO, "tools", "benchmark_open_clip.py"),
       "--model=RN50", "--batch_size=2", "--steps=1", "--warmup=0"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = compare_open_clip.last_json_line(proc.stdout)
  assert rec["batch_size"] == 2 and rec["step_time_s"]["median"] > 0


def test_open_clip_model_json_replaces_the_model_name():
  cmds = compare_open_clip.commands("/x/python", "configs/clip_b16.py:small", "ViT-B-16",
                                    64, "float32", 5, "tools/open_clip_small_cpu.json")
  assert "--model_json=tools/open_clip_small_cpu.json" in cmds["open_clip"]
  assert not any(a.startswith("--model=") for a in cmds["open_clip"])
  assert "--config=configs/clip_b16.py:small" in cmds["vlp_jax"]


def test_small_recipe_and_its_open_clip_config_describe_one_architecture():
  # open_clip builds heads as width // head_width and the MLP as width * mlp_ratio.
  from configs import clip_b16  # pylint: disable=g-import-not-at-top
  c = clip_b16.get_config("small")
  with open(os.path.join(REPO, "tools", "open_clip_small_cpu.json")) as f:
    oc = json.load(f)
  v, t = oc["vision_cfg"], oc["text_cfg"]
  img, txt = c.model.image, c.model.text
  assert oc["embed_dim"] == c.model.embed_dim
  assert (v["image_size"], v["layers"], v["width"], v["patch_size"]) == (
      c.data.image_size, img.depth, img.width, img.patch_size)
  assert v["width"] // v["head_width"] == img.num_heads
  assert v["width"] * v["mlp_ratio"] == img.mlp_dim
  assert (t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]) == (
      txt.context_length, txt.vocab_size, txt.width, txt.num_heads, txt.depth)
  assert t["width"] * t["mlp_ratio"] == txt.mlp_dim
  assert c.batch_size == 64 and c.model.dtype == "float32"
