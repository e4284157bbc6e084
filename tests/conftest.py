"""Shared pytest set-up for the vlp_jax tests."""
from absl import flags

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
