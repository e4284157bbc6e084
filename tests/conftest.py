"""Shared pytest set-up for the vlp_jax tests."""
from absl import flags

# Grain worker processes (and library code that reads absl flags) raise
# UnparsedFlagAccessError unless the flags were parsed once; pytest never does so.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: long-running tests (deselect with -m 'not slow').")
