"""Runs tests/multidevice/ in a subprocess with 8 simulated CPU devices.

Run them directly with: .venv/bin/python -m pytest tests/multidevice
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_suite(marks):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks,
       "--durations=10",  # Shown by `pytest -s` (and on failure): what the suite costs.
       os.path.join(ROOT, "tests", "multidevice")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  tail = proc.stdout[-4000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, tail
  summary = proc.stdout.strip().splitlines()[-1]  # "N passed, M deselected in T s"
  assert " passed" in summary and "failed" not in summary, tail
  print(proc.stdout[-2500:])


def test_multidevice_suite():
  _run_suite("not slow")


@pytest.mark.slow
def test_multidevice_suite_slow_cases():
  _run_suite("slow")
