"""Command-line helpers: clean errors for bad `--config.*` overrides before parsing."""
import importlib.util
import os
import sys

from absl import flags

from vlp_jax import config as config_lib
from vlp_jax import errors as errors_lib


def load_config_file(spec: str):
  """'configs/x.py[:arg]' -> ConfigDict, as ml_collections' config_flags would load it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors_lib.DataPathError(f"Config file not found: '{path}'. Pass a recipe file, "
                               "e.g. --config=configs/demo.py.")
  module_spec = importlib.util.spec_from_file_location("_vlp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def override_errors(argv, flag_name="config"):
  """Messages for `--config.a.b=v` overrides whose key path the config lacks."""
  specs = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag_name}=")]
  if not specs:
    return []
  config = load_config_file(specs[-1])
  errors = []
  for a in argv:
    if not a.startswith(f"--{flag_name}."):
      continue
    path = a[len(f"--{flag_name}."):].split("=", 1)[0]
    node, walked = config, flag_name
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        options = list(node.keys()) if hasattr(node, "keys") else []
        errors.append(f"Unknown config key '{walked}.{key}' in {a.split('=')[0]}."
                      f"{config_lib._closest(key, options)}")  # pylint: disable=protected-access
        break
      node, walked = node[key], f"{walked}.{key}"
  return errors


def parse_flags_with_config_check(argv):
  """absl flags parser that first reports unknown config keys in one clean message."""
  try:
    errors = override_errors(argv)
  except (FileNotFoundError, errors_lib.UserError) as e:
    sys.exit(f"error: {e}")
  if errors:
    sys.exit("error: " + "\n       ".join(errors) +
             "\nSee the recipe file (or vlp_jax/config.py) for the valid keys.")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, errors_lib.UserError) as e:  # A recipe's get_config(arg) raised.
    sys.exit(f"error: {e}")


class _OwnInfoOnly:
  """absl log filter: INFO lines only from vlp_jax and main.py; warnings from anyone."""

  def filter(self, record):
    import logging as std_logging  # pylint: disable=g-import-not-at-top
    path = record.pathname.replace(os.sep, "/")
    return (record.levelno >= std_logging.WARNING or "/vlp_jax/" in path
            or path.endswith("/main.py"))


def quiet_third_party_logs():
  """Hides the per-save INFO chatter of orbax/grain so progress stays readable."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def tool_flags(module_name: str):
  """(flag_values, define) for a tool in tools/: run as a script (`module_name` is
  '__main__') its flags go to absl's global FLAGS that `app.run` parses; imported (by
  tests, next to other tools defining the same names, e.g. 'workdir') to a private
  `FlagValues`, so the imports do not clash. `define(flags.DEFINE_x)(...)` defines one."""
  values = flags.FLAGS if module_name == "__main__" else flags.FlagValues()
  define = lambda fn: (lambda *a, **kw: fn(*a, flag_values=values, **kw))
  return values, define
