"""Two processes (gloo collectives, 2 CPU devices each) train like one process with 4."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config=configs/demo.py", "--config.batch_size=8", "--config.total_steps=4",
    "--config.log_every=1", "--config.checkpoint_every=2", "--config.model.embed_dim=16",
    "--config.model.image.width=32", "--config.model.image.depth=1",
    "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
    "--config.model.image.patch_size=8", "--config.model.text.width=32",
    "--config.model.text.depth=1", "--config.model.text.mlp_dim=64",
    "--config.model.text.num_heads=2", "--config.model.decoder.depth=1",
    "--config.model.decoder.num_queries=4", "--config.data.image_size=32",
    "--config.plot=False", "--config.evals.zeroshot.size=16",
    "--config.evals.zeroshot.every=0", "--config.evals.retrieval.every=-1",
    "--config.evals.captioning.every=-1",
]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, extra):
  return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}"] + TINY + extra,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
  one = launch(tmp_path / "one", ["--num_cpu_devices=4"])
  port = free_port()
  two = [launch(tmp_path / "two", ["--num_cpu_devices=2", "--num_processes=2",
                                   f"--process_id={i}",
                                   f"--coordinator_address=127.0.0.1:{port}"])
         for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in [one] + two]
  for p, out in zip([one] + two, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "Process 0 of 2: 2 local / 4 global devices" in outputs[1]
  assert "step 4/4" in outputs[1] and "step 4/4" not in outputs[2]  # Only process 0 logs.
  ref, got = rows(tmp_path / "one"), rows(tmp_path / "two")
  assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 4]
  for a, b in zip(got, ref):
    for key in ("loss", "clip/loss", "caption/loss", "grad_norm", "eval/zeroshot/top1"):
      if key in b:
        assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-6, (key, a, b)
  # Both processes took part in checkpointing: the checkpoints are complete.
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
