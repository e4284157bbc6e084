"""Non-finite (NaN/Inf) steps: detected inside the jitted step, acted on by the host.

Inside the step (`flags`, `guard`): the update is applied only if the loss, every
objective's metrics and every gradient are finite; otherwise params and optimizer
state keep their exact previous values (the step counter still advances). So no
non-finite value ever reaches the train state, whatever `config.nonfinite` says.

On the host (`Monitor`): the per-step flags are read lazily (at log steps, before
checkpoints and at the end, so the step stays asynchronous); `'skip'` counts the
skipped steps, `'halt'` raises `NonFiniteError` naming the first bad step and the
objectives that went non-finite.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vlp_jax import errors


class NonFiniteError(errors.UserError, FloatingPointError):
  """A train step produced a NaN/Inf loss or gradient under config.nonfinite='halt'."""


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def flags(metrics, grads, objective_names, grad_norm=None):
  """bool[2 + n]: [any problem, gradient non-finite, objective i non-finite ...].

  The gradient check is one test of the global gradient norm (`grad_norm`, computed
  here if not given), which is NaN or Inf iff some gradient is, or if the norm
  overflows float32 (a step to skip as well). A per-leaf isfinite reduction gives
  the same flags but made XLA's CPU compilation of the B/16 step ~6x slower."""
  if grad_norm is None:
    grad_norm = optax.tree.norm(grads)
  grads_bad = ~jnp.isfinite(grad_norm)
  obj_bad = [~_all_finite({k: v for k, v in metrics.items() if k.startswith(f"{n}/")})
             for n in objective_names]
  loss_bad = ~jnp.isfinite(metrics["loss"])
  any_bad = grads_bad | loss_bad
  for b in obj_bad:
    any_bad = any_bad | b
  return jnp.stack([any_bad, grads_bad] + obj_bad)


def guard(bad, new, old):
  """`old` where `bad` else `new`, leaf by leaf (bitwise: no arithmetic on either)."""
  return jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)


class Monitor:
  """Host side: collects each step's flags, and counts or halts on bad ones.

  Under 'skip', more than `max_consecutive` non-finite steps in a row (0: no bound)
  halt the run as 'halt' would: a diverged run would otherwise skip every update to
  `total_steps` and fill its checkpoints with the same state. `consecutive` (the
  current run of bad steps) is saved with each checkpoint, so the bound holds across
  resumes."""

  def __init__(self, mode: str, objective_names, skipped: int = 0,
               max_consecutive: int = 0, consecutive: int = 0):
    self.mode, self.names = mode, list(objective_names)
    self.skipped = int(skipped)
    self.max_consecutive = int(max_consecutive)
    self.consecutive = int(consecutive)
    self._pending = []  # (step, device flags)

  def add(self, step: int, step_flags):
    self._pending.append((step, step_flags))

  def check(self):
    """Reads the pending flags; raises NonFiniteError on a bad step under 'halt', or
    past `max_consecutive` bad steps in a row under 'skip'."""
    pending, self._pending = self._pending, []
    for step, f in pending:
      f = np.asarray(jax.device_get(f))
      if not f[0]:
        self.consecutive = 0
        continue
      self.consecutive += 1
      what = [n for n, bad in zip(self.names, f[2:]) if bad]
      if f[1]:
        what.append("gradient")
      what = ", ".join(what) or "total loss"
      advice = ("The run stopped without saving this step (the last checkpoint holds "
                "finite values). Lower the learning rate, check the data")
      if self.mode == "halt":
        raise NonFiniteError(
            f"Step {step} produced non-finite values in: {what}. {advice}, or set "
            "config.nonfinite='skip' to skip such updates.")
      if self.max_consecutive and self.consecutive > self.max_consecutive:
        raise NonFiniteError(
            f"Steps {step - self.consecutive + 1}..{step}: {self.consecutive} "
            f"consecutive steps produced non-finite values (the last in: {what}), more "
            f"than config.nonfinite_max_consecutive={self.max_consecutive}; the run has "
            f"diverged. {advice}, or resume from an earlier checkpoint.")
      self.skipped += 1
      logging.warning("Step %d: non-finite %s; skipped the update (%d skipped so far, %d "
                      "in a row).", step, what, self.skipped, self.consecutive)
