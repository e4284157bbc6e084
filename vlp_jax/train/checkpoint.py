"""Orbax (async) checkpoints of the train state together with the data-iterator state.

`workdir/checkpoints/STEP/` holds `state` (params, optimizer state, step, RNG and the
momentum teacher, if any), `data`
(the Grain iterator's position) and `meta` (JSON: resolved config, skipped-step count,
best-metric history). The newest `keep_checkpoints` are kept, plus every step that is
a multiple of `keep_every`. With `best_metric` set, the parameters of the best
evaluation so far go to a separate manager under `workdir/checkpoints_best/STEP/`,
so resuming always uses the latest checkpoint while the best one is never deleted.
Orbax writes into a temporary directory and renames it when complete: an interrupted
save is never listed as a step (and leftovers are deleted at start-up).

A save that cannot be written (permission, disk full, quota) stops the run with
`errors.SaveError` within a step: every process test-writes the directory before each
save (and, with several processes, all stop if one fails), the step directory is created
synchronously (Orbax's asynchronous creation, on failure, never sends the signal the
item writers wait for, so they sat out its 300 s coordination timeout), and
`raise_if_save_failed` polls, without blocking, for a background write that failed.
"""
import contextlib
import errno
import math
import os
import re

import grain
from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vlp_jax import errors
from vlp_jax.train import checkpoint_health, startup_checks


def _abs(workdir):
  return workdir if "://" in workdir else os.path.abspath(workdir)


def _async_options():
  """Writes stay asynchronous; only the step directory (a few mkdirs) is created in
  `save()`, so that an unwritable directory raises there. Orbax's asynchronous creation
  never signals the item writers when it fails (orbax-checkpoint 0.12.8), and they then
  block `save()` for its 300 s coordination timeout and die with a TimeoutError."""
  return ocp.AsyncOptions(create_directories_asynchronously=False)


def make_manager(workdir: str, config, cleanup: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager under `workdir/checkpoints`: the newest `keep_checkpoints`,
  plus every multiple of `keep_every` (if > 0). `cleanup` deletes leftovers of
  interrupted saves (the trainer's job: never while another process may be saving)."""
  policies = [ocp.checkpoint_managers.LatestN(n=config.keep_checkpoints)]
  if config.keep_every > 0:
    policies.append(ocp.checkpoint_managers.EveryNSteps(config.keep_every))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True, cleanup_tmp_directories=cleanup,
      async_options=_async_options(),
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(
      os.path.join(_abs(workdir), "checkpoints"), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def make_best_manager(workdir: str, config):
  """Keeps the parameters of the best `config.best_metric` evaluation (None if unset)."""
  if not config.best_metric:
    return None
  metric = config.best_metric
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True,
      async_options=_async_options(),
      preservation_policy=ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[metric], reverse=config.best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
  return ocp.CheckpointManager(
      os.path.join(_abs(workdir), "checkpoints_best"), options=options,
      item_handlers={"params": ocp.StandardCheckpointHandler()})


def is_better(value, best, mode: str) -> bool:
  """Whether eval `value` beats the `best` so far (None: nothing yet) under `mode`."""
  if value is None or not math.isfinite(value):
    return False
  return best is None or (value > best if mode == "max" else value < best)


def save_best(best_manager, step: int, params, value: float, metric: str):
  """Saves `params` as the best checkpoint (once per step: a replay after a resume
  finds the step already there)."""
  wait_for_saves(best_manager)
  if step in best_manager.all_steps():
    return
  with _reporting(best_manager, step):
    _probe(best_manager.directory)
    best_manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                      metrics={metric: float(value)}, force=True)


def _param_shapes(params):
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def check_compatible(manager, step: int, abstract_state, saved_params=None,
                     saved_teacher=None, saved_queue=None):
  """Raises CheckpointError listing missing / unexpected / reshaped parameters, or
  naming a momentum teacher or memory queue that differs from the config's."""
  if saved_params is None:
    saved_state = manager.item_metadata(step)["state"]
    saved_params, saved_teacher = saved_state["params"], saved_state.get("teacher")
    saved_queue = saved_state.get("queue")
  _check_teacher(manager, step, getattr(abstract_state, "teacher", None), saved_teacher)
  _check_queue(manager, step, getattr(abstract_state, "queue", None), saved_queue)
  saved = _param_shapes(saved_params)
  wanted = _param_shapes(abstract_state.params)
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  reshaped = [f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
              for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if missing or unexpected or reshaped:
    show = lambda xs: "; ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
    parts = [f"{name} {len(xs)}: {show(xs)}" for name, xs in (
        ("missing from the checkpoint", missing), ("unexpected in the checkpoint",
                                                   unexpected),
        ("with other shapes", reshaped)) if xs]
    raise errors.CheckpointError(
        f"Checkpoint at step {step} in {manager.directory} does not match the model of "
        f"this config. Parameters {' | '.join(parts)}. Use a fresh --workdir, or the "
        f"config the checkpoint was written with.{layout_hint(missing, unexpected)}")


def _check_teacher(manager, step, wanted, saved):
  """CheckpointError unless the checkpoint's teacher (metadata) has the names and
  shapes of this config's (`wanted`, abstract; None = no teacher)."""
  if (wanted is None) == (saved is None) and (
      wanted is None or _param_shapes(wanted) == _param_shapes(saved)):
    return
  count = lambda t: "no momentum teacher" if t is None else (
      f"a momentum teacher of {len(_param_shapes(t))} parameters")
  raise errors.CheckpointError(
      f"Checkpoint at step {step} in {manager.directory} has {count(saved)}, but this "
      f"config's config.teacher.params selects {count(wanted)}. Set config.teacher as "
      "when the checkpoint was written, or use a fresh --workdir (config.init_from "
      "can start it from this run's parameters).")


def _check_queue(manager, step, wanted, saved):
  """CheckpointError unless the checkpoint's memory queue has the entries and shapes
  of this config's (`wanted`, abstract; None = no queue)."""
  if (wanted is None) == (saved is None) and (
      wanted is None or _param_shapes(wanted) == _param_shapes(saved)):
    return
  shapes = lambda q: "no memory queue" if q is None else "a memory queue " + ", ".join(
      f"{k}{list(v)}" for k, v in sorted(_param_shapes(q).items()))
  raise errors.CheckpointError(
      f"Checkpoint at step {step} in {manager.directory} has {shapes(saved)}, but this "
      f"config's config.queue gives {shapes(wanted)}. Set config.queue (size, dim, "
      "entries) as when the checkpoint was written, or use a fresh --workdir "
      "(config.init_from can start it from this run's parameters).")


def layout_hint(missing, unexpected) -> str:
  """Names the speed switch that changes the param tree, when that explains a mismatch."""
  scanned = lambda keys: any("'layers']['block']" in k for k in keys)
  unrolled = lambda keys: any("'block_0']" in k for k in keys)
  fused = lambda keys: any("qkv_kernel" in k for k in keys)
  hints = []
  if (scanned(missing) and unrolled(unexpected)) or (
      unrolled(missing) and scanned(unexpected)):
    hints.append("config.model.scan_layers differs from the checkpoint's (scanned "
                 "blocks are stacked under 'layers/block'; unrolled ones are "
                 "'block_<i>'): set it as when the checkpoint was written, or convert "
                 "the params with vlp_jax.models.convert.stack_blocks/unstack_blocks")
  if fused(missing) != fused(unexpected):
    hints.append("config.model.fused_qkv differs from the checkpoint's (fused: "
                 "'qkv_kernel'/'qv_bias'; separate: 'query'/'key'/'value'); set it as "
                 "when the checkpoint was written (vlp_jax.models.convert.fuse_qkv "
                 "converts separate to fused)")
  return "".join(f" Likely cause: {h}." for h in hints)


def save(manager, step: int, state, data_iter=None, force: bool = False, meta=None):
  """Starts an async save of `state` (and the grain iterator's position, and `meta`).

  Raises `errors.SaveError` if this save cannot start (e.g. its directory cannot be
  created) or the previous one failed. Orbax waits for the previous save here anyway:
  waiting first only attributes its failure to its own step."""
  wait_for_saves(manager)
  with _reporting(manager, step):
    _probe(manager.directory)
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  if meta is not None:
    items["meta"] = ocp.args.JsonSave(meta)
  with _reporting(manager, step):
    manager.save(step, args=ocp.args.Composite(**items), force=force)


def _probe(directory):
  """Every process test-writes a file where the step goes (local paths; about 0.1 ms
  per save) and, with several processes, all learn whether any failed (one tiny
  all-gather per save). A directory that a process cannot write then fails the save on
  every process here, together, before any of them waits at one of Orbax's barriers
  for the failed one (up to its 300 s timeout)."""
  if "://" in str(directory):
    return
  failure = None
  try:
    startup_checks.write_probe(str(directory))
  except OSError as e:
    failure = e
  if jax.process_count() > 1:
    codes = np.asarray(multihost_utils.process_allgather(
        np.int32((failure.errno or -1) if failure else 0))).reshape(-1)
    if failure is None and codes.any():
      k = int(np.flatnonzero(codes)[0])
      code = int(codes[k]) if codes[k] > 0 else errno.EIO
      raise OSError(code, f"{os.strerror(code)} for process {k} (see its log)")
  if failure is not None:
    raise failure


def raise_if_save_failed(*managers):
  """Raises `errors.SaveError` if an async save of these managers (None: skipped) has
  failed in the background. Cheap enough for every step: never waits for a save in
  progress, and takes no lock another thread holds across a multi-host barrier."""
  for manager in managers:
    thread = _save_thread(manager)
    if thread is not None and not thread.is_alive() and thread.exception is not None:
      wait_for_saves(manager)


def _save_thread(manager):
  """The thread finishing `manager`'s latest async save (Orbax 0.12.8's private
  `_finalize_thread`), or None."""
  ref = getattr(manager, "_finalize_thread", None)
  return ref.get() if ref is not None else None


def wait_for_saves(*managers, log_only: bool = False):
  """Waits for the pending saves of `managers` (None: skipped); a failed one raises
  `errors.SaveError` (only logs it with `log_only`, when another error is already
  stopping the run). Each failure is reported once."""
  first = None
  for manager in managers:
    if manager is None:
      continue
    thread = _save_thread(manager)
    try:
      with _reporting(manager, thread.step() if thread is not None else None):
        manager.wait_until_finished()
    except errors.SaveError as e:
      if log_only:
        logging.error("%s", e)
      first = first or e
  if first is not None and not log_only:
    raise first


# errno -> (cause, what to do); an errno not listed is reported with its own message.
_CAUSES = {
    errno.EACCES: ("permission denied", "make the directory writable by the user "
                   "running the training (check its owner and mode) or choose another "
                   "--workdir"),
    errno.EPERM: ("operation not permitted", "make the directory writable by the user "
                  "running the training or choose another --workdir"),
    errno.EROFS: ("read-only file system", "remount it read-write or choose another "
                  "--workdir"),
    errno.ENOSPC: ("no space left on device", "free space on its file system (e.g. "
                   "delete old runs or lower keep_checkpoints) or choose another "
                   "--workdir"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (e.g. delete "
                   "old runs or lower keep_checkpoints), ask for a larger quota, or "
                   "choose another --workdir"),
}
# Storage errors that arrive as text (TensorStore's C++ writers raise ValueError).
_STRERRORS = {os.strerror(code).lower(): code for code in _CAUSES}


def _errno_of(exc):
  """The errno behind `exc` (its own, a chained OSError's, or one named in a
  TensorStore message), or None if `exc` is no storage error."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return exc.errno
    code = re.search(r"os_error_code='(\d+)'", str(exc))  # TensorStore's errno.
    if code:
      return int(code.group(1))
    text = str(exc).lower().replace("_", " ")  # TensorStore: PERMISSION_DENIED.
    for strerror, code in _STRERRORS.items():
      if strerror in text:
        return code
    exc = exc.__cause__ or exc.__context__
  return None


def _complete_steps(directory):
  try:
    return sorted(int(p.name) for p in epath.Path(directory).iterdir()
                  if re.fullmatch(r"\d+", p.name))
  except OSError:
    return None


@contextlib.contextmanager
def _reporting(manager, step):
  """Turns a storage error of `manager`'s save of `step` into `errors.SaveError`."""
  try:
    yield
  except errors.SaveError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    code = _errno_of(e)
    if code is None:
      raise
    raise save_error(manager.directory, step, code, e) from e


def save_error(directory, step, code: int, exc) -> errors.SaveError:
  """The SaveError for a failed save of `step` under `directory` (errno `code`)."""
  cause, todo = _CAUSES.get(code, (os.strerror(code).lower(), "fix the cause above"))
  steps = _complete_steps(directory)
  saved = [s for s in steps or [] if s != step]
  if saved:
    kept = (f"Nothing already saved was lost: the earlier checkpoints (step {saved[-1]} "
            f"is the latest) are intact, and rerunning the same command resumes from "
            f"step {saved[-1]}.")
  elif steps is not None:
    kept = ("Nothing already saved was lost (there was no earlier checkpoint): "
            "rerunning the same command starts from step 0.")
  else:
    kept = ("Nothing already saved was lost: earlier checkpoints are left as they were, "
            "and rerunning the same command resumes from the latest.")
  step_text = f"of step {step} " if step is not None else ""
  err = errors.SaveError(
      f"Could not save the checkpoint {step_text}to {directory}: {cause} ({exc}). "
      f"Training stopped. {kept} To continue, {todo}, then run the same command again.")
  err.errno = code
  return err


def restore(manager, abstract_state, data_iter=None, step=None, fallback: bool = True,
            quarantine: bool = False):
  """Restores (state, step) from `step` (default: the newest good checkpoint) into
  `abstract_state`'s shardings; (None, None) when there is no checkpoint.

  The data iterator, if given, is restored in place. Each candidate step is checked
  (`checkpoint_health.problems`, then the restore itself): a damaged newest step is
  reported and, with `fallback`, the next older one is tried (each skipped step is
  logged with what is wrong); without it, or when no step is good, `CheckpointError`
  says which steps are damaged and how. `quarantine` (the trainer's job) moves the
  damaged steps to `checkpoints_damaged/` once a good one is restored. A checkpoint of
  another model is never skipped: that is a `CheckpointError` at once.
  """
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  damaged = []  # (step, what is wrong)
  for s in steps:
    what = checkpoint_health.problems(str(manager.directory / str(s)), data_iter is not None)
    restored = None
    if not what:
      try:
        saved_state = manager.item_metadata(s)["state"]
        saved, saved_teacher = saved_state["params"], saved_state.get("teacher")
        saved_queue = saved_state.get("queue")
      except Exception as e:  # pylint: disable=broad-except
        what = [checkpoint_health.summarize(e)]
    if not what:
      check_compatible(manager, s, abstract_state, saved, saved_teacher, saved_queue)
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = manager.restore(s, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        what = [checkpoint_health.summarize(e)]
    if _all_agree(not what):
      _report_damaged(manager, damaged, s, quarantine)
      return restored["state"], s
    what = what or ["another process could not read it"]
    damaged.append((s, "; ".join(what)))
    logging.warning("Checkpoint step %d in %s is damaged: %s.", s, manager.directory,
                    damaged[-1][1])
    if not fallback:
      break
  if not damaged:
    return None, None
  listing = "; ".join(f"step {s}: {w}" for s, w in damaged)
  older = [s for s in steps if s < damaged[-1][0]]
  fix = (f"set config.damaged_checkpoint='fall_back' to resume from step {older[0]}"
         if older and not fallback else "repair or remove the damaged steps")
  raise errors.CheckpointError(
      f"No usable checkpoint in {manager.directory}: {listing}. Nothing was changed; "
      f"{fix}, or use a fresh --workdir.")


def _all_agree(ok: bool) -> bool:
  """True iff `ok` on every process (so all processes restore the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _report_damaged(manager, damaged, step, quarantine):
  if not damaged:
    return
  lost = damaged[0][0] - step
  moved = ""
  if quarantine:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlp_jax_restored_before_quarantine")
    if jax.process_index() == 0:
      paths = [checkpoint_health.quarantine(str(manager.directory), s) for s, _ in damaged]
      moved = f" Moved the damaged steps to {', '.join(paths)} (nothing deleted)."
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlp_jax_quarantined")
    manager.reload()
  logging.warning(
      "Resumed from step %d instead of the newest checkpoint step %d, which is "
      "damaged (%s); %d steps will be computed again.%s", step, damaged[0][0],
      "; ".join(f"step {s}: {w}" for s, w in damaged), lost, moved)


def restore_meta(manager, step: int) -> dict:
  """The `meta` JSON saved with checkpoint `step` ({} for checkpoints without one)."""
  if not (epath.Path(manager.directory) / str(step) / "meta").exists():
    return {}
  return dict(manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"])
