"""The training loop: `run(config, workdir)` trains; `evaluate(config, workdir)` evaluates."""
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
from vlp_jax import evaluators, objectives, sharding  # pylint: disable=unused-import
from vlp_jax.perf import flops as flops_lib
from vlp_jax.data import pipeline
from vlp_jax.train import checkpoint, evaluation, metric_writer as metrics_lib, predict
from vlp_jax.train import signals
from vlp_jax.train import prefetch, profiler as profiler_lib
from vlp_jax.train import best as best_lib, init_from, nonfinite, preemption
from vlp_jax.train import startup_checks, workdir_lock
from vlp_jax.train import setup as setup_lib, state as state_lib


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
  exp = Experiment(config, workdir)
  startup_checks.check_workdir(workdir, exp.abstract, config.keep_checkpoints,
                               best=bool(config.best_metric))
  with workdir_lock.acquire_for_run(workdir, config.lock_stale_after_s):
    return _train(exp, config, workdir, allow_config_change)


def _train(exp, config, workdir, allow_config_change):
  train_ds = pipeline.train_dataset(config, exp.tokenizer)  # Bad data paths fail here.
  manager = checkpoint.make_manager(workdir, config)
  if manager.latest_step() is not None:
    startup_checks.check_config_change(workdir, config_lib.to_dict(config),
                                       allow_config_change)
  data_iter = iter(train_ds)
  try:
    state, start = checkpoint.restore(
        manager, exp.abstract, data_iter,
        fallback=config.damaged_checkpoint == "fall_back", quarantine=True)
    meta = checkpoint.restore_meta(manager, start) if state is not None else {}
  except BaseException:
    manager.close()
    data_iter.close()
    raise
  # Only now, with the state restored and checked, may config.json change: a failed
  # resume leaves the workdir's config as it was.
  if jax.process_count() > 1:  # Everyone read the old config.json before it changes.
    multihost_utils.sync_global_devices("vlp_jax_config_checked")
  if exp.is_chief:
    _write_config(config, workdir)
  if state is None:
    state, start = state_lib.create_state(exp.model, exp.tx, config, exp.mesh), 0
    state = init_from.apply(config.init_from, state, exp.tx, exp.state_shardings)
    logging.info("Initialised a new model (%d parameters).", _num_params(state.params))
  else:
    logging.info("Resumed from the checkpoint at step %d in %s.", start, workdir)
  writer = metrics_lib.MetricWriter(workdir, exp.is_chief, resume_step=start)
  evals = exp.eval_configs()
  # Device prefetch; `batches.get_state()` is the data position after the last step.
  batches = prefetch.DevicePrefetcher(data_iter, lambda b: _to_device(b, exp),
                                      config.device_prefetch, config.total_steps - start)
  mfu = flops_lib.MfuMeter(config, exp.mesh)
  prof = profiler_lib.StepProfiler(workdir, config.profile_steps, exp.is_chief)
  monitor = nonfinite.Monitor(config.nonfinite, [o.name for o in exp.objectives],
                              meta.get("nonfinite_skipped", 0),
                              config.nonfinite_max_consecutive,
                              meta.get("nonfinite_consecutive", 0))
  tracker = best_lib.Tracker(config, workdir, meta, config_lib.to_dict(config))

  step, acc, n_acc, stopping = start, None, 0, False
  t_last, step_last = time.time(), start
  progress = _progress_bar(start, config.total_steps, exp.is_chief)
  with _closing(progress, manager, tracker, writer, data_iter, prof), \
      signals.StopRequest() as stop, jax.set_mesh(exp.mesh), \
      nn.logical_axis_rules(exp.rules):
    while step < config.total_steps and not stopping:
      batch, bad_stats = next(batches)
      prof.before_step(step)
      with prof.annotation(step):
        state, m = exp.step_fn(state, batch)
      step += 1
      prof.after_step(step, m)
      monitor.add(step, m.pop("nonfinite"))
      acc = m if acc is None else jax.tree.map(lambda a, b: a + b, acc, m)
      n_acc += 1
      progress.update(1)
      if _due(step, config.log_every, config.total_steps):
        monitor.check()
        row = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}
        dt = time.time() - t_last
        row["steps_per_sec"] = (step - step_last) / dt
        row["samples_per_sec"] = row["steps_per_sec"] * config.batch_size
        row.update(mfu.row(row["samples_per_sec"]))
        row["nonfinite/skipped"] = monitor.skipped
        row.update(bad_stats)
        writer.write(step, row)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        logging.info("step %d/%d: %s", step, config.total_steps, _fmt(row))
        acc, n_acc, t_last, step_last = None, 0, time.time(), step
      stopping = preemption.should_stop(stop.requested, step, config.stop_sync_every)
      due = [n for n, c in evals.items() if _due(step, c.every, config.total_steps)]
      if due:
        results = exp.run_evals(state.params, step, due)
        writer.write(step, results)
        tracker.on_eval(step, results, state.params)
      checkpoint.raise_if_save_failed(manager, tracker.manager)  # Never blocks.
      if _due(step, config.checkpoint_every, config.total_steps) or (
          stopping and step > start):
        monitor.check()  # Under 'halt', a bad step stops the run before any save.
        checkpoint.save(manager, step, state, batches,
                        meta=tracker.meta(monitor.skipped, monitor.consecutive))
    monitor.check()
  if stopping:
    logging.warning("Stopped by %s at step %d with a checkpoint saved; run the same "
                    "command again to resume.", stop.requested or "another process",
                    step)
    return state
  if exp.is_chief and config.plot and os.path.exists(writer.path):
    logging.info("Wrote %s", metrics_lib.plot_curves(workdir))
  return state


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


def _to_device(host_batch, exp):
  batch, bad_stats = pipeline.split_bad_counts(host_batch)
  return sharding.make_global_batch(batch, exp.mesh, exp.rules), bad_stats


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
