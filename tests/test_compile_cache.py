"""The persistent compilation cache (vlp_jax/compile_cache.py): where
config.compilation_cache_dir points, a second process loading what the first wrote,
'' turning it off, an unwritable directory only warned about; and evaluation
compiling each program once, not once per evaluation."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests import test_eval_suite
from vlp_jax import compile_cache, errors
from vlp_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def back_to_session_cache():
  """Whatever a test enables, the session's cache (tests/conftest.py) afterwards."""
  yield
  compile_cache.enable("auto")


def test_auto_resolves_from_the_environment(monkeypatch, tmp_path):
  for var in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.resolve("auto") == str(tmp_path / "home/.cache/vlp_jax/xla")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == str(tmp_path / "xdg/vlp_jax/xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert compile_cache.resolve("auto") == str(tmp_path / "jax")
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "vlp"))
  assert compile_cache.resolve("auto") == str(tmp_path / "vlp")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve("~/c") == str(tmp_path / "home/c")
  with pytest.raises(errors.ConfigTypeError, match="compilation_cache_dir"):
    compile_cache.resolve(None)


def test_default_config_shares_the_auto_directory():
  from vlp_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.default_config().compilation_cache_dir == "auto"


def test_enable_is_idempotent_and_empty_turns_it_off(tmp_path, monkeypatch,
                                                     back_to_session_cache):
  resets = []
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  reset = jax_cache.reset_cache
  monkeypatch.setattr(jax_cache, "reset_cache", lambda: (resets.append(1), reset()))
  path = str(tmp_path / "cache")
  assert compile_cache.enable(path) == path and os.path.isdir(path)
  assert jax.config.jax_compilation_cache_dir == path
  n = len(resets)
  assert compile_cache.enable(path) == path and len(resets) == n  # Nothing redone.
  assert compile_cache.enable("") == ""
  assert jax.config.jax_compilation_cache_dir is None
  assert compile_cache.active_dir() == ""
  jax.jit(lambda x: x * 3)(1.0).block_until_ready()  # Runs without a cache.


def test_unwritable_directory_warns_and_runs_without_cache(tmp_path, caplog,
                                                           back_to_session_cache):
  (tmp_path / "a_file").write_text("not a directory")
  bad = str(tmp_path / "a_file" / "cache")
  with caplog.at_level("WARNING"):
    assert compile_cache.enable(bad) == ""
  assert "cannot be written" in caplog.text and bad in caplog.text
  assert "compilation_cache_dir" in caplog.text  # How to fix it.
  assert jax.config.jax_compilation_cache_dir is None
  assert float(jax.jit(lambda x: x + 1)(1.0)) == 2.0


@pytest.mark.slow  # Compiles a tiny CoCa's train step without a cache (~30 s).
def test_training_with_an_unwritable_cache_directory_still_trains(
    tmp_path, caplog, back_to_session_cache):
  from tests import test_train  # pylint: disable=g-import-not-at-top
  (tmp_path / "a_file").write_text("")
  c = test_train.tiny_config(total_steps=1)
  c.compilation_cache_dir = str(tmp_path / "a_file" / "cache")
  with caplog.at_level("INFO"):
    loop.run(c, str(tmp_path / "run"))
  assert "cannot be written" in caplog.text
  assert "Time to first step" in caplog.text
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from vlp_jax import compile_cache
    compile_cache.enable("auto")
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((64, 32))).block_until_ready()
    print(json.dumps(compile_cache.counts()))
""")


def _process(cache):
  env = dict(os.environ, **{compile_cache.ENV: str(cache),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _entries(cache):
  return sorted(f for f in os.listdir(cache) if f.endswith("-cache"))


def test_a_second_process_loads_what_the_first_wrote(tmp_path):
  cache = tmp_path / "cache"
  first = _process(cache)
  assert first["loaded"] == 0 and first["compiled"] >= 1 and first["written"] >= 1
  entries = _entries(cache)
  assert len(entries) == first["written"]
  second = _process(cache)
  assert second == {"loaded": first["compiled"], "compiled": 0, "written": 0}
  assert _entries(cache) == entries  # No new entries.


@contextlib.contextmanager
def _max_size(value):
  """JAX's cache cap set to `value` in the block (the session's afterwards)."""
  before = jax.config.jax_compilation_cache_max_size
  jax.config.update("jax_compilation_cache_max_size", value)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_max_size", before)


def _atimes(cache):
  return sorted(f for f in os.listdir(cache) if f.endswith("-atime"))


def test_entries_written_without_a_cap_do_not_block_capped_writes(
    tmp_path, back_to_session_cache):
  """A capped cache reads every entry's access-time file when it writes; plain JAX
  without a cap writes none. `enable` adds them, so the next program is stored and
  a reopened cache (as a new process would) loads it."""
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  jnp = jax.numpy
  cache = str(tmp_path / "cache")
  compile_cache.enable("")
  with _max_size(-1):  # Plain JAX, no cap: as another program or an older run writes.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.jit(lambda x: jnp.sin(x) * 2)(np.ones(7, np.float32)).block_until_ready()
    jax_cache.reset_cache()
  old = _entries(cache)
  assert old and not _atimes(cache)
  with _max_size(compile_cache.MAX_SIZE_BYTES):  # What `enable` sets outside the tests.
    before = compile_cache.counts()
    assert compile_cache.enable(cache) == cache
    assert len(_atimes(cache)) == len(old)  # Added for the old entries.
    jax.jit(lambda x: jnp.cos(x) + 3)(np.ones(7, np.float32)).block_until_ready()
    assert len(_entries(cache)) == len(old) + 1 == len(_atimes(cache))  # Written.
    assert compile_cache.counts()["written"] == before["written"] + 1
    compile_cache.enable("")
    compile_cache.enable(cache)  # Reopened; a fresh function: no in-memory executable.
    loaded = compile_cache.counts()["loaded"]
    y = jax.jit(lambda x: jnp.cos(x) + 3)(np.ones(7, np.float32))
    assert float(y[0]) == pytest.approx(np.cos(1.0) + 3)
    assert compile_cache.counts()["loaded"] == loaded + 1


def test_a_write_that_fails_is_not_counted_as_written(tmp_path, back_to_session_cache):
  """JAX signals a write before attempting it; a write it drops (here: an entry over
  the cap) stores nothing, and `counts()` says so."""
  cache = str(tmp_path / "cache")
  before = compile_cache.counts()
  with _max_size(16):  # Every entry is larger: JAX warns and stores nothing.
    compile_cache.enable(cache)
    with pytest.warns(UserWarning, match="exceeds the maximum cache size"):
      jax.jit(lambda x: jax.numpy.tanh(x) - 5)(np.ones(9, np.float32)).block_until_ready()
    compile_cache.enable("")
  assert not _entries(cache)
  after = compile_cache.counts()
  assert after["compiled"] == before["compiled"] + 1
  assert after["written"] == before["written"]


def test_multihost_default_directory_is_warned_about(tmp_path, caplog,
                                                     back_to_session_cache):
  path = str(tmp_path / "home/.cache/vlp_jax/xla")
  warning = compile_cache.multihost_warning(path, True, 4)
  assert path in warning and "compilation_cache_dir" in warning
  assert "shared" in warning and "4 processes" in warning
  assert compile_cache.multihost_warning(path, True, 1) is None  # One host.
  assert compile_cache.multihost_warning(path, False, 4) is None  # The user's choice.
  assert compile_cache.multihost_warning("", True, 4) is None  # Off.
  with pytest.MonkeyPatch.context() as mp:  # Undone before the session cache is back.
    for var in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
      mp.delenv(var, raising=False)
    assert compile_cache._from_default(" auto ")  # pylint: disable=protected-access
    assert not compile_cache._from_default(path)  # pylint: disable=protected-access
    mp.setenv("HOME", str(tmp_path / "home"))
    mp.setattr(jax.distributed, "is_initialized", lambda: True)
    mp.setattr(jax, "process_count", lambda: 4)
    with caplog.at_level("WARNING"):
      assert compile_cache.enable("auto") == path  # Warns, and goes on.
    assert "only process 0 writes" in caplog.text
    mp.setenv("JAX_COMPILATION_CACHE_DIR", path)
    assert not compile_cache._from_default("auto")  # pylint: disable=protected-access
  assert compile_cache.enable("auto") == os.environ["JAX_COMPILATION_CACHE_DIR"]


# ------------------------------------------------ evaluation compiles once per shape


@contextlib.contextmanager
def counting_compiles():
  """Counts jaxpr traces and XLA compilations (cache loads included) in the block."""
  events = []
  names = ("/jax/core/compile/jaxpr_trace_duration",
           "/jax/core/compile/backend_compile_duration")

  def listener(event, duration, **unused):
    del duration
    if event in names:
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _evals(c, **entries):
  """name -> evaluator cfg of `entries` (sizes leave a partial last batch of 8)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  c = c.copy_and_resolve_references()
  c.evals = {name: common.eval_entry(type=name, split="validation", batch_size=8, **kw)
             for name, kw in entries.items()}
  return evaluation.eval_configs(c)


@pytest.fixture(scope="module")
def tiny():
  return test_eval_suite.tiny_two_tower(context_length=16)


def _two_rounds(evals, fns, params):
  """(events of the first round, of the second round, results, results again)."""
  from vlp_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with counting_compiles() as first:
    results = evaluation.run_evals(evals, fns, params, 1, mesh=mesh)
  with counting_compiles() as second:
    again = evaluation.run_evals(evals, fns, params, 2, mesh=mesh)
  return first, second, results, again


def test_a_second_evaluation_compiles_nothing(tiny):
  c, fns, params = tiny
  evals = _evals(c, zeroshot=dict(source="shapes:classes", size=20, templates="simple"),
                 retrieval=dict(source="shapes", size=12))
  first, second, results, again = _two_rounds(evals, fns, params)
  assert first  # The counter sees compilations ...
  assert second == []  # ... and the second round has none.
  assert again == results


def test_the_counter_sees_a_jit_made_per_call(tiny):
  """The check above can fail: an embed fn jitted anew on each call recompiles."""
  c, fns, params = tiny
  fns = dict(fns)
  embed = fns["embed_image"]
  fns["embed_image"] = lambda p, x: jax.jit(lambda p, x: embed(p, x))(p, x)  # pylint: disable=unnecessary-lambda
  evals = _evals(c, zeroshot=dict(source="shapes:classes", size=20, templates="simple"))
  _, second, _, _ = _two_rounds(evals, fns, params)
  assert second


@pytest.mark.slow  # Compiles a tiny CoCa's caption decoding (~10-20 s on 2 cores).
def test_a_second_captioning_evaluation_compiles_nothing(tmp_path):
  from tests import test_train  # pylint: disable=g-import-not-at-top
  c = test_train.tiny_config(evals=True)
  c.evals = {"captioning": c.evals.captioning}
  c.evals.captioning.update(size=5, max_len=6)
  exp = loop.Experiment(c, str(tmp_path))
  params = exp.create_state().params
  first, second, results, again = _two_rounds(exp.eval_configs(), exp.predict_fns,
                                              params)
  assert first and second == [] and again == results
