"""The sharded train step equals the single-device one on 8 simulated CPU devices."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_meshes_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_check.py")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result) == {"data8", "data2_fsdp2_tensor2"}
  for name, diffs in result.items():
    assert diffs["loss"] <= 1.0, (name, diffs)
    assert diffs["params"] <= 1.0, (name, diffs)
