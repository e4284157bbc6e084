"""`config.profile_steps = [a, b]`: a jax.profiler trace of train steps a..b-1."""
import os

import jax
from absl import logging


class StepProfiler:
  """Starts a trace before step `a` runs and stops it once step `b - 1` has finished.

  The trace goes to `workdir/profile` (TensorBoard's profile plugin reads it; the
  `*.trace.json.gz` file opens in https://ui.perfetto.dev). Steps are annotated
  with `StepTraceAnnotation` so the profiler's step view lines up with train steps.
  """

  def __init__(self, workdir: str, steps, enabled: bool = True):
    self.start, self.stop = int(steps[0]), int(steps[1])
    self.enabled = enabled and self.stop > self.start
    self.logdir = os.path.join(workdir, "profile")
    self.active = False

  def annotation(self, step: int):
    """Context manager marking train step `step` (0-based) in the trace."""
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def before_step(self, step: int):
    """Call with the 0-based index of the step about to run."""
    if self.enabled and not self.active and step == self.start:
      os.makedirs(self.logdir, exist_ok=True)
      jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
      self.active = True

  def after_step(self, steps_done: int, outputs):
    """Call after dispatching a step; stops (after waiting for `outputs`) at `b`."""
    if self.active and steps_done >= self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Wrote a profile of steps %d..%d to %s", self.start, self.stop - 1,
                   self.logdir)
