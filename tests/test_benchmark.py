"""tools/benchmark.py: one JSON record, no data-pipeline imports, clean config errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlp_jax.train import prefetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/demo.py", "--config.batch_size=8", "--config.data.image_size=32",
        "--config.model.image.depth=1", "--config.model.text.depth=1",
        "--config.model.decoder.depth=1", "--steps=3", "--warmup=1"]


def run_tool(tmp_path, args):
  # Shadow the data stack: the benchmark must run where grain/tfds are not installed.
  for name in ("grain", "tensorflow_datasets"):
    (tmp_path / f"{name}.py").write_text(
        f"raise ImportError('{name} is hidden by the benchmark test')\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
  return subprocess.run([sys.executable, "tools/benchmark.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_benchmark_prints_one_json_record_without_grain(tmp_path):
  prof = tmp_path / "prof"
  proc = run_tool(tmp_path, TINY + ["--config.model.scan_layers=True",
                                    f"--profile_dir={prof}", "--profile_steps=2"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  rec = json.loads(lines[0])
  assert rec["step_time_s"]["steps"] == 3
  assert 0 < rec["step_time_s"]["min"] <= rec["step_time_s"]["median"] <= rec[
      "step_time_s"]["max"]
  assert rec["samples_per_s"] == 8 / rec["step_time_s"]["median"]
  assert rec["compile_s"] > 0 and rec["model_gflops_per_sample"] > 0
  assert 0.7 < rec["xla_over_model_flops"] < 1.5
  assert rec["peak_source"] == "measured f32 matmul" and 0 < rec["mfu"] < 1
  assert rec["memory"]["peak_bytes_estimate"] > 0
  assert rec["device_kind"] == "cpu" and rec["jax_version"]
  assert rec["overrides"]["model.scan_layers"] == "True"
  assert rec["with_data"] is False
  # --profile_dir: a trace, the compiled HLO and a summary with the matmuls found.
  p = rec["profile"]
  assert p["steps"] == 2 and p["timeline"] == "host" and p["step_wall_ms"] > 0
  assert p["categories"]["matmul"]["fraction"] > 0.05
  assert (prof / "hlo.txt").exists() and "| matmul |" in (prof / "summary.md").read_text()
  out = subprocess.run([sys.executable, "tools/profile_summary.py", str(prof), "--top=5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| matmul |" in out.stdout and out.stdout.count("\n| ") >= 5


def test_benchmark_unknown_key_is_a_clean_error(tmp_path):
  proc = run_tool(tmp_path, TINY + ["--config.model.scan_layer=True"])
  assert proc.returncode != 0
  assert "Unknown config key 'config.model.scan_layer'" in proc.stderr
  assert "scan_layers" in proc.stderr  # the suggestion
  assert "Traceback" not in proc.stderr


class _Source:
  """An iterator with grain-style get_state: the index of the next element."""

  def __init__(self, n):
    self.i, self.n = 0, n

  def __next__(self):
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"next": self.i}


def test_device_prefetch_keeps_order_and_the_consumed_position():
  moved = []
  it = prefetch.DevicePrefetcher(_Source(5), lambda x: moved.append(x) or x * 10, size=2)
  assert json.loads(it.get_state()) == {"next": 0}
  assert next(it) == 0
  assert moved == [0, 1, 2]  # two batches in flight beyond the one returned
  assert json.loads(it.get_state()) == {"next": 1}  # resume at the next unconsumed
  assert list(it) == [10, 20, 30, 40]
  assert json.loads(it.get_state()) == {"next": 5}
  assert list(prefetch.DevicePrefetcher(_Source(3), lambda x: x, size=0)) == [0, 1, 2]
  src = _Source(10)
  assert list(prefetch.DevicePrefetcher(src, lambda x: x, size=2, limit=4)) == [0, 1, 2, 3]
  assert src.i == 4  # never reads past the limit


@pytest.mark.slow  # compiles a (tiny) train step and runs the pipeline: ~25 CPU-s
def test_with_data_compares_synthetic_real_and_the_pipeline_alone(tmp_path,
                                                                  monkeypatch):
  from tests import datagen  # pylint: disable=g-import-not-at-top
  from vlp_jax import cli  # pylint: disable=g-import-not-at-top
  from vlp_jax.perf import benchmark, flops  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(flops, "peak_flops", lambda *a, **k: (1e12, "test"))  # no matmuls
  c = cli.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  c.batch_size, c.model.text.context_length = 4, 12
  c.device_prefetch, c.data.prefetch = 1, 1  # few buffered batches to skip per round
  c.data.update(source="jsonl:" + datagen.write_jsonl(str(tmp_path), 10), image_size=16,
                tokenizer="bytes", normalize_on_device=True)
  c.model.image.update(depth=1, patch_size=8)
  c.model.text.update(depth=1, vocab_size=259)
  c.model.decoder.depth = 1
  c.evals = {}
  rec = benchmark.run(c, steps=2, warmup=1, with_data=True, rounds=2)
  d = rec["data"]
  assert rec["with_data"] is True and rec["step_time_s"]["steps"] == 2  # 2 rounds x 1
  assert d["rounds"] == 2 and d["steps_per_round"] == 1 and len(d["round_ratios"]) == 2
  assert d["skipped_per_round"] == benchmark.buffered_batches(c) == 4
  assert d["real_samples_per_s"] == 4 / d["real_step_s"]
  assert d["synthetic_samples_per_s"] == 4 / d["synthetic_step_s"]
  assert d["real_over_synthetic"] == float(np.median(d["round_ratios"])) > 0
  assert d["pipeline_samples_per_s"] == 4 * d["pipeline_batches_per_s"] > 0
  assert d["normalize_on_device"] is True and d["worker_count"] == 0
  assert d["source"] == c.data.source
  assert np.isfinite(rec["final_loss"])
  assert d["bottleneck"] in ("none", "pipeline", "overlap")
  for key in ("synthetic_cpu_s_per_step", "real_cpu_s_per_step",
              "pipeline_samples_per_cpu_s"):
    assert d[key] is None or d[key] > 0, key


def test_bottleneck_names_what_is_in_the_way():
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  rec = lambda r, p: {"real_over_synthetic": r, "pipeline_samples_per_s": p,
                      "synthetic_samples_per_s": 100.0}
  assert benchmark.bottleneck(rec(1.04, 50.0)) == "none"
  assert benchmark.bottleneck(rec(1.5, 50.0)) == "pipeline"
  assert benchmark.bottleneck(rec(1.5, 300.0)) == "overlap"
