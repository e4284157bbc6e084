"""Errors a user can fix: a config value, a data path, a workdir, a checkpoint.

`main.py` prints the message of a `UserError` alone (no traceback) and exits with
status 1; `--verbose` (or `VLP_JAX_VERBOSE=1`) shows the traceback too. Any other
exception is a bug and keeps its traceback. Each class also derives from the builtin
exception that describes it, so `except ValueError` and the like keep working.
"""


class UserError(Exception):
  """Base class: the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value is invalid (out of range, inconsistent with another key)."""


class ConfigKeyError(UserError, KeyError):
  """A config key (or a registered name) is unknown."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ""


class ConfigTypeError(UserError, TypeError):
  """A config value has the wrong type."""


class DataPathError(UserError, FileNotFoundError):
  """A data path (file, directory, shard) is missing or is the wrong kind of path."""


class DataError(UserError, ValueError):
  """The data cannot be used as given (too many unreadable records, bad columns)."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used: not writable, full, absent (for evaluation)."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live run holds the workdir's lock."""


class CheckpointError(UserError, ValueError):
  """A checkpoint does not match the model, or none usable can be restored."""


class SaveError(UserError, OSError):
  """A checkpoint could not be written (permission, disk full, quota)."""
