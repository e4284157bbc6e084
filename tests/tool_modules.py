"""Imports a script of tools/ as a module in tests (tools/ is not a package)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
  """tools/NAME.py as a fresh module (its absl flags stay private: `cli.tool_flags`)."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
