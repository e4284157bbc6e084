"""Best-by-metric checkpoint tracking and the `meta` JSON saved with every checkpoint."""
from absl import logging

from vlp_jax.train import checkpoint


class Tracker:
  """Holds what a checkpoint's `meta` records: the resolved config, the count of
  skipped non-finite steps, and the history of `config.best_metric` with its best."""

  def __init__(self, config, workdir: str, meta: dict, config_dict: dict):
    self.metric, self.mode = config.best_metric, config.best_mode
    self.config_dict = config_dict
    self.history = [tuple(x) for x in meta.get("best_history", [])]
    self.best = meta.get("best")  # {"step": int, "value": float} or None
    self.manager = checkpoint.make_best_manager(workdir, config)

  def meta(self, nonfinite_skipped: int, nonfinite_consecutive: int = 0) -> dict:
    return {"config": self.config_dict, "nonfinite_skipped": int(nonfinite_skipped),
            "nonfinite_consecutive": int(nonfinite_consecutive),
            "best_metric": self.metric, "best_mode": self.mode,
            "best_history": [list(x) for x in self.history], "best": self.best}

  def on_eval(self, step: int, results: dict, params):
    """Records `results[best_metric]`; saves `params` to checkpoints_best/ if better."""
    if not self.metric or self.metric not in results:
      return
    value = float(results[self.metric])
    self.history.append((step, value))
    if checkpoint.is_better(value, self.best and self.best["value"], self.mode):
      self.best = {"step": step, "value": value}
      checkpoint.save_best(self.manager, step, params, value, self.metric)
      logging.info("New best %s=%.4f at step %d (saved to checkpoints_best/).",
                   self.metric, value, step)

  def close(self):
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
