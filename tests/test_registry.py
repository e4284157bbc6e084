"""Registries: lookups never depend on import order; declarations are checked."""
import subprocess
import sys

import pytest

from vlp_jax import errors, registry

_FRESH = """
import sys
from vlp_jax.registry import EVALUATORS, MODELS, OBJECTIVES, SOURCES
assert "vlp_jax.objectives" not in sys.modules and "vlp_jax.models" not in sys.modules
print(OBJECTIVES.get("{0}").__name__, OBJECTIVES.info("{0}")["batch_global"],
      MODELS.get("coca").__name__, "zeroshot" in EVALUATORS, SOURCES.get("jsonl").__name__)
"""


def test_lookup_in_a_fresh_process_imports_the_registering_package():
  proc = subprocess.run([sys.executable, "-c", _FRESH.format("clip")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["clip", "True", "CoCa", "True", "make_jsonl_source"]


def test_declarations_are_checked_at_registration():
  reg = registry.Registry("widget", "vlp_jax", required=("reads",),
                          optional={"batch_global": False})
  with pytest.raises(TypeError, match=r"declare \['reads'\]"):
    reg.register("a")(lambda: None)
  with pytest.raises(TypeError, match=r"unknown declarations \['batch_globl'\]"):
    reg.register("b", reads=(), batch_globl=True)(lambda: None)
  reg.register("c", reads=("x",))(len)
  assert reg.get("c") is len and reg.info("c") == {"reads": ("x",), "batch_global": False}
  with pytest.raises(ValueError, match="registered twice"):
    reg.register("c", reads=())(len)
  reg.register("c", replace=True, reads=())(abs)
  assert reg.get("c") is abs
  with pytest.raises(errors.ConfigKeyError, match="Unknown widget 'cc'. Did you mean 'c'"):
    reg.get("cc")
