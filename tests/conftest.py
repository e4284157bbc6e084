"""Shared pytest set-up for the vlp_jax tests."""
import os
import tempfile

from absl import flags

# Many tests (and the subprocesses they start, which inherit the environment) compile
# the same tiny programs: share one compilation cache per test session. It starts
# empty each session, so no result depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlp_jax_jit_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Grain worker processes (and library code that reads absl flags) raise
# UnparsedFlagAccessError unless the flags were parsed once; pytest never does so.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: long-running tests (deselect with -m 'not slow').")


# tests/multidevice/ needs 8 simulated CPU devices, which must be set before JAX starts:
# test_multidevice.py runs it in a subprocess with XLA_FLAGS, so skip it here.
collect_ignore = ["multidevice"]
