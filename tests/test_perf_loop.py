"""The trainer logs TFLOP/s and MFU, and writes a profile for config.profile_steps."""
import glob
import os

import pytest

from tests import test_train
from vlp_jax.train import loop, metric_writer as metrics_lib

# tiny_config()'s set-up, shared with the session's other loop tests (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("shared_compilations")


def test_trainer_logs_mfu_and_writes_a_profile(tmp_path):
  c = test_train.tiny_config()  # Its 8 steps: the train step the session has compiled.
  c.checkpoint_every = 100
  c.profile_steps = [1, 3]
  c.device_prefetch = 2
  loop.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
          if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 9))
  for r in rows:
    assert r["perf/tflops_per_device"] > 0 and 0 < r["perf/mfu"] < 1
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, os.listdir(tmp_path / "profile")
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.trace.json.gz"), recursive=True)
