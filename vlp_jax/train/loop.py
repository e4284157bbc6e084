"""The training loop, top-down as big_vision's trainers.

    run(config, workdir)      set-up (Experiment) -> workdir checks and lock ->
                              _restore -> the loop (_Loop: train_step, log, check_stop,
                              evaluate, save) -> finish
    evaluate(config, workdir) the configured evaluators on a trained workdir

Evaluation orchestration is `evaluation.py`; checkpoints `checkpoint.py`.
"""
import contextlib
import json
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vlp_jax import config as config_lib, errors
from vlp_jax import evaluators
from vlp_jax.perf import flops as flops_lib
from vlp_jax.data import pipeline
from vlp_jax.train import checkpoint, evaluation, metric_writer as metrics_lib, predict
from vlp_jax.train import signals
from vlp_jax.train import prefetch, profiler as profiler_lib
from vlp_jax.train import best as best_lib, init_from, nonfinite, preemption
from vlp_jax.train import startup_checks, workdir_lock
from vlp_jax.train import setup as setup_lib


class Experiment(setup_lib.TrainSetup):
  """The train setup plus what training and evaluation add: tokenizer, predict fns."""

  def __init__(self, config, workdir: str, devices=None):
    super().__init__(config, devices)
    if config.evals:
      evaluators.check_config(config)
    self.workdir = workdir
    self.tokenizer = pipeline.make_tokenizer(config.data)
    if self.tokenizer.vocab_size > config.model.text.vocab_size:
      raise ValueError(
          f"Tokenizer '{config.data.tokenizer}' has {self.tokenizer.vocab_size} ids but "
          f"model.text.vocab_size is {config.model.text.vocab_size}; raise the latter.")
    self.predict_fns = predict.make_predict_fns(
        self.model, self.tokenizer, config.model.text.context_length)
    self.is_chief = jax.process_index() == 0

  def eval_configs(self):
    """name -> evaluator cfg (`cfg.every`: its period) of the enabled evals."""
    return evaluation.eval_configs(self.config)

  def run_evals(self, params, step, names=None):
    """{'eval/NAME/METRIC': value} of the enabled evals (only `names` if given)."""
    return evaluation.run_evals(self.eval_configs(), self.predict_fns, params, step,
                                mesh=self.mesh, names=names)


def _write_config(config, workdir):
  """Writes config.json atomically (a crash leaves the old one or the new one)."""
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(config_lib.to_dict(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _due(step, every, total):
  return step == total or (every > 0 and step % every == 0)


def run(config, workdir: str, allow_config_change: bool = False):
  """Trains `config` in `workdir`, resuming from its latest good checkpoint if any.

  `allow_config_change` permits resuming a workdir whose saved config.json differs in
  model keys (see `startup_checks.py`). The run holds the workdir's lock
  (`workdir_lock.py`) from before it touches anything there until it ends.
  """
  exp = Experiment(config, workdir)  # Set-up: every config check, model, mesh, step.
  startup_checks.check_workdir(workdir, exp.abstract, config.keep_checkpoints,
                               best=bool(config.best_metric))
  with workdir_lock.acquire_for_run(workdir, config.lock_stale_after_s):
    data_iter = iter(pipeline.train_dataset(config, exp.tokenizer, exp.batch))
    manager = checkpoint.make_manager(workdir, config)
    state, start, meta = _restore(exp, manager, data_iter, allow_config_change)
    loop = _Loop(exp, state, start, meta, manager, data_iter)
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
    state = init_from.apply(config.init_from, state, exp.tx, exp.state_shardings)
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
    self.prof.after_step(self.step, m)
    self.monitor.add(self.step, m.pop("nonfinite"))
    self.acc = m if self.acc is None else jax.tree.map(lambda a, b: a + b, self.acc, m)
    self.n_acc += 1
    self.progress.update(1)

  def log(self):
    """Every `log_every` steps: the window's mean metrics, speed and MFU."""
    config = self.config
    if not _due(self.step, config.log_every, config.total_steps):
      return
    self.monitor.check()
    row = {k: float(v) / self.n_acc for k, v in jax.device_get(self.acc).items()}
    row["steps_per_sec"] = (self.step - self.step_last) / (time.time() - self.t_last)
    row["samples_per_sec"] = row["steps_per_sec"] * config.batch_size
    row.update(self.mfu.row(row["samples_per_sec"]))
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


def evaluate(config, workdir: str, step=None):
  """Runs every configured evaluator on the checkpoint in `workdir` (default: the
  newest good one). Reads only: takes no lock, creates and deletes nothing (a training
  run may be writing the workdir)."""
  exp = Experiment(config, workdir)
  evals = exp.eval_configs()
  if not evals:
    raise errors.ConfigError("config.evals enables no evaluator (each needs every >= 0); "
                             "enable one, e.g. --config.evals.zeroshot.every=0.")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if "://" not in workdir and not os.path.isdir(ckpt_dir):
    raise errors.WorkdirError(
        f"No checkpoints to evaluate: {ckpt_dir} does not exist. Pass the --workdir of a "
        "trained run (or train first with --mode=train).")
  manager = checkpoint.make_manager(workdir, config, cleanup=False)  # Training may run.
  try:
    state, step = checkpoint.restore(manager, exp.abstract, step=step)
  finally:
    manager.close()
  if state is None:
    raise errors.WorkdirError(f"No checkpoint found in {ckpt_dir}; train first "
                              "(--mode=train) or pass the workdir of a trained run.")
  results = exp.run_evals(state.params, step)
  if exp.is_chief:
    metrics_lib.MetricWriter(workdir, True, resume_step=1 << 62).write(step, results)
  return results


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
