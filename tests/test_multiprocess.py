"""Two processes (gloo collectives, 2 CPU devices each) train like one process (this one,
on its one device: that a mesh of devices trains like one device is tests/multidevice/)."""
import ast
import json
import os
import socket
import subprocess
import sys

import pytest

from configs import demo
from vlp_jax.train import loop

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


def launch(workdir, args):
  return subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}"] + args,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# The two-process run's flags: TINY with tests/test_train.tiny_config()'s remaining
# model, optimizer and schedule values, so that the single-process reference below is
# a set-up the session has already compiled.
RUN = [a for a in TINY if a.split("=")[0] not in (
    "--config.total_steps", "--config.checkpoint_every", "--config.evals.zeroshot.size")
       ] + ["--config.total_steps=8", "--config.checkpoint_every=4",
            "--config.keep_checkpoints=10", "--config.model.text.context_length=24",
            "--config.optim.warmup_steps=2", "--config.evals.zeroshot.size=24",
            "--config.evals.zeroshot.batch_size=8"]


def config_from_flags(argv):
  """configs/demo.py with `argv`'s --config.KEY=VALUE overrides (the test checks that
  main.py wrote the same config.json)."""
  assert argv[0] == "--config=configs/demo.py", argv[0]
  config = demo.get_config()
  for a in argv[1:]:
    key, value = a[len("--config."):].split("=", 1)
    config.update_from_flattened_dict({key: ast.literal_eval(value)})
  return config


@pytest.mark.usefixtures("shared_compilations")  # The reference: tiny_config()'s set-up.
def test_two_processes_match_one(tmp_path):
  port = free_port()
  two = [launch(tmp_path / "two", RUN + [
      "--num_cpu_devices=2", "--num_processes=2", f"--process_id={i}",
      f"--coordinator_address=127.0.0.1:{port}"]) for i in range(2)]
  # Meanwhile, the same config in this process, on its one device.
  loop.run(config_from_flags(RUN), str(tmp_path / "one"))
  outputs = [p.communicate(timeout=300)[0] for p in two]
  for p, out in zip(two, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "Process 0 of 2: 2 local / 4 global devices" in outputs[0]
  assert "step 8/8" in outputs[0] and "step 8/8" not in outputs[1]  # Only process 0 logs.
  with open(tmp_path / "one" / "config.json") as f1, \
      open(tmp_path / "two" / "config.json") as f2:
    assert json.load(f1) == json.load(f2)  # The same config, all of it.
  ref, got = rows(tmp_path / "one"), rows(tmp_path / "two")
  assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 9)) + [8]
  for a, b in zip(got, ref):
    for key in ("loss", "clip/loss", "caption/loss", "grad_norm", "eval/zeroshot/top1"):
      if key in b:
        assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]) + 1e-6, (key, a, b)
  # Both processes took part in checkpointing: the checkpoints are complete.
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["4", "8"]
