"""JAX's persistent compilation cache: compiled programs on disk, reused by the next
process that compiles the same program (a resumed run, `--mode=eval`, the tools, a
second benchmark of the same shapes).

`config.compilation_cache_dir` (top-level key; `enable` reads it):

    'auto' (default)  $VLP_JAX_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR,
                      else $XDG_CACHE_HOME/vlp_jax/xla, else ~/.cache/vlp_jax/xla:
                      one directory shared by the trainer and every tool
    ''                off
    PATH              that directory (created if missing; gs:// etc. through etils)

Entries are keyed by the program (HLO), the devices, the XLA flags and the jax
version, so a changed model, batch size, mesh or jax upgrade simply misses. Only
programs that took at least MIN_COMPILE_TIME_SECS to compile are written (tiny ones
load barely faster than they compile), and the directory is capped at MAX_SIZE_BYTES
(least recently used entries evicted). JAX's own environment variables
(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, JAX_COMPILATION_CACHE_MAX_SIZE) override
both. With a cap JAX guards every read and write with a file lock in the directory,
so several processes on one host may share it; on multi-host runs only process 0
writes. A directory that cannot be written is reported and the run goes on without
the cache: the cache never fails a run.
"""
import os
import tempfile
from typing import Optional

from absl import logging

ENV = "VLP_JAX_COMPILATION_CACHE"
# Programs compiling faster than this are not written (see the module docstring).
MIN_COMPILE_TIME_SECS = 0.2
MAX_SIZE_BYTES = 4 << 30

_state = {"dir": None}  # The directory this process uses ('' = off; None = never set).
# jax.monitoring events -> the counts `counts()` reports.
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "loaded",
           "/jax/compilation_cache/cache_misses": "written"}
_counts = {"requests": 0, "loaded": 0, "written": 0}
_listening = []


def _listener(event, **unused_kwargs):
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def counts() -> dict:
  """Programs of this process since the cache was first enabled: {'loaded' (from it),
  'compiled' (not found there), 'written' (compiled and stored)}."""
  return {"loaded": _counts["loaded"], "compiled": _counts["requests"] - _counts["loaded"],
          "written": _counts["written"]}


def active_dir() -> str:
  """The directory `enable` turned on ('' = none)."""
  return _state["dir"] or ""


def default_dir() -> str:
  """The directory 'auto' resolves to (see the module docstring)."""
  for var in (ENV, "JAX_COMPILATION_CACHE_DIR"):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".cache")
  return os.path.join(base, "vlp_jax", "xla")


def resolve(value) -> str:
  """The directory `config.compilation_cache_dir` = `value` names ('' = off)."""
  if not isinstance(value, str):
    from vlp_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.ConfigTypeError(
        f"config.compilation_cache_dir must be a string ('auto', '' for off, or a "
        f"directory), got {value!r}.")
  value = value.strip()
  if value == "auto":
    return default_dir()
  return os.path.expanduser(value) if value else ""


def _unwritable(path: str) -> Optional[str]:
  """Why `path` cannot hold the cache, or None when it can (local paths only)."""
  if "://" in path:
    return None  # Remote (etils epath): JAX reports its own errors as warnings.
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    return f"{type(e).__name__}: {e}"
  return None


def _has_filelock() -> bool:
  """JAX's capped cache needs the `filelock` package (its lock between processes)."""
  try:
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.warning("The compilation cache is neither capped nor locked between "
                    "processes: install the `filelock` package for both.")
    return False
  return True


def enable(path_or_config) -> str:
  """Turns JAX's persistent compilation cache on for this process, in the directory
  `path_or_config` names (a path, 'auto', '' = off, or a config whose
  `compilation_cache_dir` is one); -> the directory used ('' = none). Call it before
  anything compiles. Calling it again with the same directory does nothing; another
  directory replaces the first. An unwritable directory logs a warning and leaves the
  cache off."""
  value = path_or_config
  if not isinstance(value, str):
    value = path_or_config.get("compilation_cache_dir", "auto")
  path = resolve(value)
  if path == _state["dir"]:
    return path
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  why = _unwritable(path) if path else None
  if why:
    logging.warning(
        "The compilation cache directory %s cannot be written (%s); running without "
        "the cache (every program compiles). Fix its permissions, or set "
        "--config.compilation_cache_dir to a writable directory ('' turns the cache "
        "off; the default 'auto' honours $%s).", path, why, ENV)
    path = ""
  if _state["dir"] is not None or jax.config.jax_compilation_cache_dir:
    jax_cache.reset_cache()  # The cache opens once per process: reopen it here.
  jax.config.update("jax_compilation_cache_dir", path or None)
  if path:
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs",
                        MIN_COMPILE_TIME_SECS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and _has_filelock():
      jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    if not _listening:
      jax.monitoring.register_event_listener(_listener)
      _listening.append(True)
    logging.info("Compilation cache: %s (config.compilation_cache_dir; '' turns it "
                 "off).", path)
  elif not why:
    logging.info("Compilation cache off (config.compilation_cache_dir='').")
  _state["dir"] = path
  return path
