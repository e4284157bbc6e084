"""The training loop, top-down as big_vision's trainers.

    run(config, workdir)      set-up (Experiment) -> workdir checks and lock ->
                              _restore -> the loop (_Loop: train_step, log, check_stop,
                              evaluate, save) -> finish
    evaluate(config, workdir) the configured evaluators on a checkpoint (or on the
                              init_from parameters) -> WORKDIR/eval/step_N/results.json

Evaluation orchestration is `evaluation.py`; checkpoints `checkpoint.py`.
"""
import contextlib
import copy
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax import compile_cache, config as config_lib, errors
from vlp_jax import evaluators
from vlp_jax.perf import flops as flops_lib
from vlp_jax.data import json_files, pipeline
from vlp_jax.train import checkpoint, evaluation, metric_writer as metrics_lib, predict
from vlp_jax.train import signals
from vlp_jax.train import prefetch, profiler as profiler_lib
from vlp_jax.train import best as best_lib, init_from, nonfinite, preemption
from vlp_jax.train import startup_checks, workdir_lock
from vlp_jax.train import setup as setup_lib


class Experiment(setup_lib.TrainSetup):
  """The train setup plus what training and evaluation add: tokenizer, predict fns."""

  def __init__(self, config, workdir: str, devices=None):
    compile_cache.enable(config)  # Before anything compiles.
    super().__init__(config, devices)
    if config.evals:
      evaluators.check_config(config)
    self.workdir = workdir
    self.tokenizer = pipeline.make_tokenizer(config.data)
    # Vocabulary size, pad ids, text pooling against the tokenizer.
    startup_checks.check_tokenizer(config, self.tokenizer)
    self.predict_fns = predict.make_predict_fns(
        self.model, self.tokenizer, config.model.text.context_length)
    self.is_chief = jax.process_index() == 0

  def eval_configs(self):
    """name -> evaluator cfg (`cfg.every`: its period) of the enabled evals."""
    return evaluation.eval_configs(self.config)

  def run_evals(self, params, step, names=None):
    """{'eval/NAME/METRIC': value} of the enabled evals (only `names` if given)."""
    return evaluation.run_evals(self.eval_configs(), self.predict_fns, params, step,
                                mesh=self.mesh, names=names, rules=self.rules)


def _write_config(config, workdir):
  """Writes config.json atomically (a crash leaves the old one or the new one)."""
  json_files.write_atomic(os.path.join(workdir, "config.json"),
                          config_lib.to_dict(config), sort_keys=True)


def _due(step, every, total):
  return step == total or (every > 0 and step % every == 0)


def run(config, workdir: str, allow_config_change: bool = False):
  """Trains `config` in `workdir`, resuming from its latest good checkpoint if any.

  `allow_config_change` permits resuming a workdir whose saved config.json differs in
  model keys (see `startup_checks.py`). The run holds the workdir's lock
  (`workdir_lock.py`) from before it touches anything there until it ends.
  """
  t_run = time.time()
  exp = Experiment(config, workdir)  # Set-up: every config check, model, mesh, step.
  startup_checks.check_workdir(workdir, exp.abstract, config.keep_checkpoints,
                               best=bool(config.best_metric))
  with workdir_lock.acquire_for_run(workdir, config.lock_stale_after_s):
    data_iter = iter(pipeline.train_dataset(config, exp.tokenizer, exp.batch))
    manager = checkpoint.make_manager(workdir, config)
    t_setup = time.time()
    state, start, meta = _restore(exp, manager, data_iter, allow_config_change)
    loop = _Loop(exp, state, start, meta, manager, data_iter)
    loop.startup = {"imports": _process_age() - (time.time() - t_run),
                    "set-up": t_setup - t_run, "state": time.time() - t_setup}
    with loop.running():
      while loop.step < config.total_steps and not loop.stopping:
        loop.train_step()
        loop.log()
        loop.check_stop()
        loop.evaluate()
        loop.save()
    return loop.finish()


def _restore(exp, manager, data_iter, allow_config_change):
  """(state, start step, checkpoint meta): the newest good checkpoint (its data position
  restored into `data_iter`), else a new state (`config.init_from` applied). Writes
  config.json only once the state is restored and checked, so a failed resume leaves
  the workdir's config as it was."""
  config, workdir = exp.config, exp.workdir
  try:
    if manager.latest_step() is not None:
      startup_checks.check_config_change(workdir, config_lib.to_dict(config),
                                         allow_config_change)
    state, start = checkpoint.restore(
        manager, exp.abstract, data_iter,
        fallback=config.damaged_checkpoint == "fall_back", quarantine=True)
    meta = checkpoint.restore_meta(manager, start) if state is not None else {}
  except BaseException:
    manager.close()
    data_iter.close()
    raise
  if jax.process_count() > 1:  # Everyone read the old config.json before it changes.
    multihost_utils.sync_global_devices("vlp_jax_config_checked")
  if exp.is_chief:
    _write_config(config, workdir)
  if state is None:
    state, start = exp.create_state(), 0
    state = init_from.apply(config.init_from, state, exp.tx, exp.state_shardings,
                            teacher_cfg=config.teacher)
    logging.info("Initialised a new model (%d parameters).", _num_params(state.params))
  else:
    logging.info("Resumed from the checkpoint at step %d in %s.", start, workdir)
  return state, start, meta


class _Loop:
  """The training loop's state and its named steps: train_step, log, check_stop,
  evaluate, save (each called once per step, in that order), then finish."""

  def __init__(self, exp, state, start, meta, manager, data_iter):
    config, workdir = exp.config, exp.workdir
    self.exp, self.config, self.state = exp, config, state
    self.start = self.step = self.step_last = start
    self.manager, self.data_iter = manager, data_iter
    self.stopping, self.stop = False, None
    self.writer = metrics_lib.MetricWriter(workdir, exp.is_chief, resume_step=start)
    self.evals = exp.eval_configs()
    # Device prefetch; `batches.get_state()` is the data position after the last step.
    self.batches = prefetch.DevicePrefetcher(
        data_iter, self._to_device, config.device_prefetch, config.total_steps - start)
    self.mfu = flops_lib.MfuMeter(config, exp.mesh)
    self.prof = profiler_lib.StepProfiler(workdir, config.profile_steps, exp.is_chief)
    self.monitor = nonfinite.Monitor(
        config.nonfinite, [o.name for o in exp.objectives],
        meta.get("nonfinite_skipped", 0), config.nonfinite_max_consecutive,
        meta.get("nonfinite_consecutive", 0))
    self.tracker = best_lib.Tracker(config, workdir, meta, config_lib.to_dict(config))
    self.progress = _progress_bar(start, config.total_steps, exp.is_chief)
    self.acc, self.n_acc, self.bad_stats, self.t_last = None, 0, {}, time.time()
    self.startup = {}  # Seconds of each start-up phase, for the time-to-first-step log.

  def _to_device(self, host_batch):
    batch, bad_stats = pipeline.split_bad_counts(host_batch)
    return self.exp.global_batch(batch), bad_stats

  @contextlib.contextmanager
  def running(self):
    """Signals, mesh and axis rules while training; waits for pending saves and closes
    everything on the way out, also when training raises."""
    with _closing(self.progress, self.manager, self.tracker, self.writer,
                  self.data_iter, self.prof), signals.StopRequest() as stop, \
        jax.set_mesh(self.exp.mesh), nn.logical_axis_rules(self.exp.rules):
      self.stop = stop
      yield self
      self.monitor.check()

  def train_step(self):
    """One optimisation step on the next batch; metrics accumulate on device."""
    batch, self.bad_stats = next(self.batches)
    self.prof.before_step(self.step)
    with self.prof.annotation(self.step):
      self.state, m = self.exp.step_fn(self.state, batch)
    self.step += 1
    if self.step == self.start + 1:
      self._log_first_step(m)
    self.prof.after_step(self.step, m)
    self.monitor.add(self.step, m.pop("nonfinite"))
    self.acc = m if self.acc is None else jax.tree.map(lambda a, b: a + b, self.acc, m)
    self.n_acc += 1
    self.progress.update(1)

  def _log_first_step(self, metrics):
    """Logs the time to the first completed step (since the process started) and its
    parts; waits for that step once."""
    jax.block_until_ready(metrics)
    total = _process_age()
    parts = dict(self.startup)
    parts["data + first step"] = total - sum(parts.values())
    cache = ""
    if compile_cache.active_dir():
      cache = "; compilation cache: {loaded} programs loaded, {compiled} compiled, " \
              "{written} written".format(**compile_cache.counts())
    logging.info("Time to first step: %.2fs since the process started (%s)%s.", total,
                 ", ".join(f"{k} {v:.2f}s" for k, v in parts.items()), cache)

  def log(self):
    """Every `log_every` steps: the window's mean metrics, speed and MFU."""
    config = self.config
    if not _due(self.step, config.log_every, config.total_steps):
      return
    self.monitor.check()
    row = {k: float(v) / self.n_acc for k, v in jax.device_get(self.acc).items()}
    row["steps_per_sec"] = (self.step - self.step_last) / (time.time() - self.t_last)
    row["samples_per_sec"] = row["steps_per_sec"] * config.batch_size
    row.update(self.mfu.row(row["samples_per_sec"], self.step))
    row["nonfinite/skipped"] = self.monitor.skipped
    row.update(self.bad_stats)
    self.writer.write(self.step, row)
    self.progress.set_postfix(loss=f"{row['loss']:.4f}")
    logging.info("step %d/%d: %s", self.step, config.total_steps, _fmt(row))
    self.acc, self.n_acc, self.t_last, self.step_last = None, 0, time.time(), self.step

  def check_stop(self):
    """SIGTERM/SIGINT on any process stops every process at the same step."""
    self.stopping = preemption.should_stop(self.stop.requested, self.step,
                                           self.config.stop_sync_every)

  def evaluate(self):
    """The evaluators due at this step; results logged and offered to `best_metric`."""
    due = [n for n, c in self.evals.items()
           if _due(self.step, c.every, self.config.total_steps)]
    if due:
      results = self.exp.run_evals(self.state.params, self.step, due)
      self.writer.write(self.step, results)
      self.tracker.on_eval(self.step, results, self.state.params)

  def save(self):
    """A checkpoint every `checkpoint_every` steps, at the end and when stopping."""
    checkpoint.raise_if_save_failed(self.manager, self.tracker.manager)  # Never blocks.
    if _due(self.step, self.config.checkpoint_every, self.config.total_steps) or (
        self.stopping and self.step > self.start):
      self.monitor.check()  # Under 'halt', a bad step stops the run before any save.
      checkpoint.save(self.manager, self.step, self.state, self.batches,
                      meta=self.tracker.meta(self.monitor.skipped,
                                             self.monitor.consecutive))

  def finish(self):
    """After the loop: how it ended, and the curves of a finished run."""
    if self.stopping:
      logging.warning("Stopped by %s at step %d with a checkpoint saved; run the same "
                      "command again to resume.", self.stop.requested or "another process",
                      self.step)
    elif self.exp.is_chief and self.config.plot and os.path.exists(self.writer.path):
      logging.info("Wrote %s", metrics_lib.plot_curves(self.exp.workdir))
    return self.state


@contextlib.contextmanager
def _closing(progress, manager, tracker, writer, data_iter, prof):
  """Waits for pending saves and closes everything, also when training raises. A
  failed save raises `errors.SaveError` (only logged if the run already fails)."""
  failed = True
  try:
    yield
    failed = False
  finally:
    prof.close()
    progress.close()
    try:
      checkpoint.wait_for_saves(manager, tracker.manager, log_only=failed)
    finally:
      manager.close()
      tracker.close()
      writer.close()
      data_iter.close()  # Stops grain's worker processes (config.data.worker_count).


def evaluate(config, workdir: str, step=None, eval_dir=None):
  """Runs every configured evaluator on checkpoint `step` of `workdir` (default: the
  newest good one) or, when the workdir has no checkpoint, on the parameters that
  `config.init_from` names (another run's or an imported model: step 0). Writes the
  results to `eval_dir` (default WORKDIR/eval/step_N, `evaluation.results_dir`) and
  returns {'eval/NAME/METRIC': value}. Leaves the run's own files alone: takes no lock
  and creates nothing but the results directory (a training run may be writing)."""
  exp = Experiment(config, workdir)
  if not exp.eval_configs():
    raise errors.ConfigError("config.evals enables no evaluator (each needs every >= 0); "
                             "enable one, e.g. --config.evals.zeroshot.every=0.")
  params, step, params_from = eval_params(exp, workdir, step)
  results = exp.run_evals(params, step)
  if compile_cache.active_dir():
    logging.info("Compilation cache: {loaded} programs loaded, {compiled} compiled, "
                 "{written} written.".format(**compile_cache.counts()))
  if exp.is_chief:
    out = evaluation.results_dir(workdir, step, eval_dir,
                                 from_init=params_from.startswith("init_from"))
    logging.info("Wrote %s", evaluation.write_results(out, step, results, params_from,
                                                      config))
  return results


def eval_params(exp, workdir: str, step=None):
  """(params, step, where they came from) that `evaluate` uses: checkpoint `step` of
  `workdir` (None: the newest good one), else `config.init_from`'s parameters."""
  config = exp.config
  ckpt_dir = os.path.join(workdir, "checkpoints")
  has_dir = "://" in workdir or os.path.isdir(ckpt_dir)
  if has_dir:
    manager = checkpoint.make_manager(workdir, config, cleanup=False)  # Training may run.
    try:
      steps = sorted(manager.all_steps())
      if step is not None and step not in steps:
        raise errors.WorkdirError(
            f"No checkpoint at step {step} in {ckpt_dir} (it has steps {steps}); pass "
            "one of them to --step, or leave --step out for the newest.")
      try:
        state, got = checkpoint.restore(manager, exp.abstract, step=step)
        params = None if state is None else state.params
      except errors.CheckpointError as mismatch:  # Saved at another image size?
        params, got = _restore_resized(exp, manager, step if step is not None else
                                       steps[-1], mismatch)
    finally:
      manager.close()
    if params is not None:
      return params, got, f"checkpoint {ckpt_dir}/{got}"
  if _init_from_set(config.init_from):
    if step is not None:
      raise errors.WorkdirError(
          f"--step={step} names a checkpoint, but {workdir} has none; leave --step out "
          "to evaluate the parameters config.init_from names.")
    params, _ = init_from.load_params(config, exp.abstract.params)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      # Parameters init_from leaves out (allow_missing, include) keep a fresh init.
      fresh = exp.create_state().params
      params = jax.tree.map(lambda p, f: f if isinstance(p, jax.ShapeDtypeStruct) else p,
                            params, fresh)
    init = config.init_from
    source = " ".join(filter(None, (init.get("format", ""), init.checkpoint or init.workdir)))
    return params, 0, f"init_from {source}"
  if not has_dir:
    raise errors.WorkdirError(
        f"No checkpoints to evaluate: {ckpt_dir} does not exist. Pass the --workdir of a "
        "trained run (or train first with --mode=train), or set config.init_from to "
        "evaluate another run's or an imported model's parameters.")
  raise errors.WorkdirError(f"No checkpoint found in {ckpt_dir}; train first "
                            "(--mode=train) or pass the workdir of a trained run.")


def _restore_resized(exp, manager, step, mismatch):
  """(params, step) of checkpoint `step` trained at another `data.image_size` than
  `exp.config`'s: restored into the model of its own size, then its image position
  embeddings resized (bicubic, as open_clip) to this config's grid. Raises `mismatch`
  when the positions do not explain it."""
  from vlp_jax.interop import common as interop_common  # pylint: disable=g-import-not-at-top
  try:
    pos = manager.item_metadata(step)["state"]["params"]["img"]["pos_embedding"]
    target = exp.abstract.params["img"]["pos_embedding"]
  except (KeyError, TypeError):
    raise mismatch from None
  grid = int(round(pos.shape[1] ** 0.5))
  if grid * grid != pos.shape[1] or tuple(pos.shape) == tuple(target.shape):
    raise mismatch
  config = copy.deepcopy(exp.config)
  config.data.image_size = grid * exp.config.model.image.patch_size
  own = setup_lib.TrainSetup(config)
  state, got = checkpoint.restore(manager, own.abstract, step=step)  # Other diffs raise.
  new_grid = int(round(target.shape[1] ** 0.5))
  resized = interop_common.resize_grid(np.asarray(state.params["img"]["pos_embedding"])[0],
                                       new_grid)[None]
  params = dict(state.params)
  params["img"] = dict(params["img"], pos_embedding=jax.device_put(
      resized.astype(target.dtype), target.sharding))
  logging.info("Checkpoint step %d was trained at %d px; its image position embeddings "
               "are resized from a %dx%d to a %dx%d grid for %d px.", got,
               config.data.image_size, grid, grid, new_grid, new_grid,
               exp.config.data.image_size)
  return params, got


_IMPORTED = time.time()


def _process_age() -> float:
  """Seconds since this process started (Linux /proc; elsewhere since this module
  was imported)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.time() - _IMPORTED


def _init_from_set(init_cfg) -> bool:
  return bool(init_cfg.workdir or init_cfg.checkpoint)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _fmt(row):
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(row.items()))


def _progress_bar(start, total, enabled, stream=None):
  """A tqdm bar on a terminal; off when the output is a file or pipe (CI, nohup,
  SLURM logs), where the periodic log lines report progress instead."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  stream = sys.stderr if stream is None else stream
  interactive = hasattr(stream, "isatty") and stream.isatty()
  return tqdm(total=total, initial=start, disable=not (enabled and interactive),
              desc="train", unit="step", dynamic_ncols=True, file=stream)
