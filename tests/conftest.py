"""Shared pytest set-up for the vlp_jax tests."""
import atexit
import json
import os
import shutil
import sys
import tempfile

import pytest
from absl import flags

# Many tests (and the subprocesses they start, which inherit the environment) compile
# the same tiny programs: share one compilation cache per test session. It starts
# empty each session, so no result depends on an earlier run. config.compilation_cache_dir
# 'auto' (vlp_jax/compile_cache.py) resolves to it: never to the user's own cache, even
# when the environment names one. Every process writes even the tiniest programs, with
# no size cap: a capped cache lists and reads the whole directory on every write, which
# over the suite's thousands of tiny entries costs minutes (and every process agreeing
# on "no cap" means no entry lacks the access-time file a capped cache needs).
os.environ.pop("VLP_JAX_COMPILATION_CACHE", None)
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlp_jax_jit_cache_")
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = "-1"
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
if "jax" in sys.modules:  # Imported before this file (by a plugin): set it directly.
  for _name in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE",
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
    _value = os.environ[_name]
    sys.modules["jax"].config.update(
        _name.lower(), _value if _name.endswith("_DIR") else
        (float(_value) if "TIME" in _name else int(_value)))

# The tests' tiny programs take far longer to compile than to run: skip XLA's LLVM
# optimisation passes (the HLO, hence what is computed, is the same; a third to half the
# CPU time of the compile-bound tests). Subprocesses inherit it. Run the suite with
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test fully optimised code.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "jax" in sys.modules:  # Imported before this file (by a plugin): set it directly.
  sys.modules["jax"].config.update(
      "jax_disable_most_optimizations",
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes"))

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


# --- Opt-in sharing of compiled set-ups: a module whose tests build many Experiments
# (each `loop.run` / `loop.evaluate` builds one) of the same few configs declares
#   pytestmark = pytest.mark.usefixtures("shared_compilations")
# and reuses one Experiment per model/optimizer/data config for the whole session, so
# its jitted train step, predict fns and state initialiser are traced, lowered and
# loaded once instead of once per run. Everything is still built by the real code
# (`loop.Experiment`, `state.create_state`): a config not seen before (one that is
# invalid included) builds a new Experiment.

# Keys that only the loop, checkpointing and evaluation read, from the config they are
# handed (`exp.config` is always the caller's): set-ups differing only in these are
# shared. Their checks still run on every call (see `shared_experiment`).
LOOP_ONLY_KEYS = (
    "best_metric", "best_mode", "checkpoint_every", "damaged_checkpoint",
    "device_prefetch", "evals", "init_from", "keep_checkpoints", "keep_every",
    "lock_stale_after_s", "log_every", "nonfinite", "nonfinite_max_consecutive", "plot",
    "profile_steps", "stop_sync_every")
_SHARED_SETUPS = {}  # (setup key, devices) -> Experiment built by the real class.
_SHARED_INIT_FNS = {}  # (id(model), id(tx), setup key) -> (model, tx, init fn).


def setup_key(config):
  """JSON of `config` without LOOP_ONLY_KEYS: equal for equal set-ups."""
  from vlp_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  d = config_lib.to_dict(config)
  return json.dumps({k: v for k, v in d.items() if k not in LOOP_ONLY_KEYS},
                    sort_keys=True)


@pytest.fixture(scope="module")
def shared_compilations():
  """Makes `loop.Experiment(config, workdir, devices)` return a copy of the one built
  before for an equal set-up (`setup_key`) and devices, holding this call's config and
  workdir; and `state.create_state` reuse the initialiser it jitted for the same model
  and optimizer objects (the same executable, with no new trace)."""
  import copy  # pylint: disable=g-import-not-at-top
  from vlp_jax import evaluators, validation  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import loop, state as state_lib  # pylint: disable=g-import-not-at-top
  experiment_cls, init_fn = loop.Experiment, state_lib._init_fn  # pylint: disable=protected-access

  def shared_experiment(config, workdir, devices=None):
    key = (setup_key(config), None if devices is None else tuple(d.id for d in devices))
    if key not in _SHARED_SETUPS:
      _SHARED_SETUPS[key] = experiment_cls(config, workdir, devices)
    else:  # The checks of Experiment.__init__ that read LOOP_ONLY_KEYS.
      validation.validate(config, evals=False)
      if config.evals:
        evaluators.check_config(config)
    exp = copy.copy(_SHARED_SETUPS[key])
    exp.config, exp.workdir = config, workdir
    return exp

  def shared_init_fn(model, tx, config):
    key = (id(model), id(tx), setup_key(config))
    if key not in _SHARED_INIT_FNS:  # Holds model and tx: their ids stay theirs.
      _SHARED_INIT_FNS[key] = (model, tx, init_fn(model, tx, config))
    return _SHARED_INIT_FNS[key][2]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "Experiment", shared_experiment)
    mp.setattr(state_lib, "_init_fn", shared_init_fn)
    yield


# --- Longest files first. `make test` runs files on two workers (`--dist loadfile`)
# in collection order (`--no-loadscope-reorder`: xdist's default order, most tests
# first, put the single 2-3 minute multi-device test last, leaving one worker idle for
# minutes). Measured file costs (seconds on 2 cores, `--durations=0`); files not named
# keep their order after these. Refresh the list when a file's cost changes a lot.
LONGEST_FILES_FIRST = (
    "test_multidevice.py", "test_fault_tolerance.py", "test_prior.py",
    "test_perf_features.py", "test_token_reduction.py", "test_models.py",
    "test_siglip2.py", "test_reliability.py", "test_multiprocess.py",
    "test_method_recipes_run.py", "test_curation.py", "test_accumulate.py",
    "test_bad_records.py", "test_save_errors.py", "test_objective_contract.py",
    "test_benchmark.py", "test_m3ae.py", "test_train.py", "test_data_e2e.py",
    "test_teacher.py")


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  key = lambda item: rank.get(os.path.basename(str(item.path)), len(rank))
  items[:] = sorted(items, key=key)  # Stable: tests keep their order within a file.
