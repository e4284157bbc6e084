"""tools/benchmark.py: one JSON record, no data-pipeline imports, clean config errors."""
import json
import os
import subprocess
import sys

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
