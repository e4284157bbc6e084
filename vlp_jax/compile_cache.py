"""JAX's persistent compilation cache: compiled programs on disk, reused by the next
process that compiles the same program (a resumed run, `--mode=eval`, the tools, a
second benchmark of the same shapes).

`config.compilation_cache_dir` (top-level key; `enable` reads it):

    'auto' (default)  $VLP_JAX_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR,
                      else $XDG_CACHE_HOME/vlp_jax/xla, else ~/.cache/vlp_jax/xla:
                      one directory shared by the trainer and every tool
    ''                off
    PATH              that directory (created if missing; gs:// etc. through etils)

Entries are keyed (jax/_src/cache_key.py) by the lowered program, the jaxlib version,
the backend and its platform version, $XLA_FLAGS and $LIBTPU_INIT_ARGS, the compile
options, the device topology and the compression; so a changed model, batch size,
mesh, flag or jaxlib upgrade simply misses (an upgrade of jax alone reuses entries of
the programs it lowers identically). Only programs that took at least
MIN_COMPILE_TIME_SECS to compile are written (tiny ones load barely faster than they
compile), and the directory is capped at MAX_SIZE_BYTES (least recently used entries
evicted). JAX's own environment variables (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS,
JAX_COMPILATION_CACHE_MAX_SIZE) override both. With a cap JAX guards every read and
write with a file lock in the directory, so several processes on one host may share
it, and needs an access-time file per entry: `enable` adds one to entries an uncapped
process wrote (local directories). On multi-host runs only process 0 writes, so the
directory must be one every host reads (a shared filesystem or bucket): the default,
under the home directory of each host, is warned about. A directory that cannot be
written is reported and the run goes on without the cache: the cache never fails a run.
"""
import os
import tempfile
from typing import Optional

from absl import logging

ENV = "VLP_JAX_COMPILATION_CACHE"
# Programs compiling faster than this are not written (see the module docstring).
MIN_COMPILE_TIME_SECS = 0.2
MAX_SIZE_BYTES = 4 << 30

# The directory this process uses ('' = off; None = never set), the entries it held
# when enabled (None when it cannot be listed) and the write events counted by then.
_state = {"dir": None, "entries": None, "misses": 0, "written_before": 0}
# jax.monitoring events -> the counts `counts()` reports. A 'miss' is a program JAX is
# about to store: the write may still fail (JAX then only warns).
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "loaded",
           "/jax/compilation_cache/cache_misses": "misses"}
_counts = {"requests": 0, "loaded": 0, "misses": 0}
_listening = []
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # jax/_src/lru_cache.py's names.


def _listener(event, **unused_kwargs):
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def _entries(path: str) -> Optional[set]:
  """Names of the entries in the local directory `path` (None: remote or unreadable)."""
  if not path or "://" in path:
    return None
  try:
    return {f for f in os.listdir(path) if f.endswith(_CACHE_SUFFIX)}
  except OSError:
    return None


def _written_here() -> int:
  """Entries this process stored in the current directory: the writes JAX attempted
  that left a new entry there (exact unless other processes write at the same time;
  never more than this process attempted)."""
  if not _state["dir"]:
    return 0  # Off (writes JAX made meanwhile went to no directory of ours).
  attempted = _counts["misses"] - _state["misses"]
  now, then = _entries(_state["dir"]), _state["entries"]
  if now is None or then is None:
    return attempted
  return min(attempted, len(now - then))


def counts() -> dict:
  """Programs of this process since the cache was first enabled: {'loaded' (from it),
  'compiled' (not found there), 'written' (compiled and stored)}."""
  return {"loaded": _counts["loaded"], "compiled": _counts["requests"] - _counts["loaded"],
          "written": _state["written_before"] + _written_here()}


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


def backfill_access_times(path: str) -> int:
  """Gives each entry of the local cache directory `path` that lacks one the access-time
  file JAX's capped cache reads when it evicts (entries written without a cap have
  none, and then every capped write fails); -> how many were added. The entry's
  modification time stands in for its last use."""
  entries = _entries(path)
  if not entries:
    return 0
  try:
    import filelock  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 0  # JAX's cap needs it too, and reports its absence.
  added = 0
  try:
    with filelock.FileLock(os.path.join(path, ".lockfile"), timeout=10):
      for name in sorted(entries):
        key = name[:-len(_CACHE_SUFFIX)]
        atime = os.path.join(path, key + _ATIME_SUFFIX)
        try:
          if os.path.exists(atime):
            continue
          stamp = os.stat(os.path.join(path, name)).st_mtime_ns
          with open(atime, "wb") as f:  # lru_cache.py: time.time_ns(), 8 bytes LE.
            f.write(stamp.to_bytes(8, "little"))
          added += 1
        except FileNotFoundError:
          continue  # Evicted meanwhile by another process.
  except (OSError, filelock.Timeout) as e:
    logging.warning("Could not add access times to the compilation cache entries in "
                    "%s (%s: %s); writes may fail until they have one. Delete the "
                    "directory's *-cache files to start it afresh.", path,
                    type(e).__name__, e)
  return added


def multihost_warning(path: str, from_default: bool, process_count: int
                      ) -> Optional[str]:
  """The warning for a run of `process_count` processes using the cache directory
  `path` (`from_default`: 'auto' with neither environment variable set), or None."""
  if process_count <= 1 or not path or not from_default:
    return None
  return (f"The compilation cache directory {path} is the per-host default, but this "
          f"run has {process_count} processes and only process 0 writes the cache: "
          f"the other hosts never find their programs there. Set "
          f"--config.compilation_cache_dir (or ${ENV}) to a directory every host "
          f"shares (a shared filesystem path or a bucket), or '' to turn it off.")


def _from_default(value: str) -> bool:
  """Whether `config.compilation_cache_dir` = `value` resolves to the built-in default."""
  return (value.strip() == "auto" and
          not any(os.environ.get(v) for v in (ENV, "JAX_COMPILATION_CACHE_DIR")))


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
  _state["written_before"] += _written_here()
  jax.config.update("jax_compilation_cache_dir", path or None)
  if path:
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs",
                        MIN_COMPILE_TIME_SECS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and _has_filelock():
      jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    if jax.config.jax_compilation_cache_max_size > 0:
      backfill_access_times(path)  # Before the cap's first write reads them.
    if not _listening:
      jax.monitoring.register_event_listener(_listener)
      _listening.append(True)
    logging.info("Compilation cache: %s (config.compilation_cache_dir; '' turns it "
                 "off).", path)
    # jax.process_count() before jax.distributed.initialize would start the backend.
    processes = jax.process_count() if jax.distributed.is_initialized() else 1
    warning = multihost_warning(path, _from_default(value), processes)
    if warning:
      logging.warning(warning)
  elif not why:
    logging.info("Compilation cache off (config.compilation_cache_dir='').")
  _state.update(dir=path, entries=_entries(path), misses=_counts["misses"])
  return path
