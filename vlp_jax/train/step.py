"""The jitted train step: one forward pass, a weighted sum of objectives, an optax update."""
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import accumulate, nonfinite


class WeightedObjective(NamedTuple):
  name: str
  fn: Callable
  weight: float
  cfg: Any


def objectives_from_config(config):
  """[(name, fn, weight, options)] for `config.objectives` (weights) / `objective_cfg`."""
  out = []
  for name, weight in config.objectives.items():
    cfg = config.objective_cfg.get(name, {})
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out.append(WeightedObjective(name, OBJECTIVES.get(name), float(weight), cfg))
  return out


def compute_loss(params, model, objectives, batch, rng, train=True):
  """Sum of weighted objectives on one forward pass -> (total, metrics)."""
  outputs = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for obj in objectives:
    loss, m = obj.fn(outputs, batch, obj.cfg)
    total = total + obj.weight * loss
    metrics.update({f"{obj.name}/{k}": v for k, v in m.items()})
  metrics["loss"] = total
  if "logit_scale" in outputs:
    metrics["logit_scale"] = outputs["logit_scale"]
  if "logit_bias" in outputs:
    metrics["logit_bias"] = outputs["logit_bias"]
  return total, metrics


def train_step(state, batch, *, model, objectives, tx, schedule, accum_steps=1):
  """One optimisation step; returns (new_state, metrics).

  With `accum_steps` > 1 the gradient is accumulated over that many micro-batches,
  keeping all negatives of the batch (see `accumulate.py`). A step with a non-finite
  loss or gradient leaves params and optimizer state unchanged (see `nonfinite.py`);
  `metrics['nonfinite']` holds its flags.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if accum_steps > 1:
    grads, metrics = accumulate.accumulated_grads(
        state.params, model, objectives, batch, rng, accum_steps)
  else:
    grad_fn = jax.grad(compute_loss, has_aux=True)
    grads, metrics = grad_fn(state.params, model, objectives, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  flags = nonfinite.flags(metrics, grads, [o.name for o in objectives], grad_norm)
  params, opt_state = nonfinite.guard(flags[0], (params, opt_state),
                                      (state.params, state.opt_state))
  metrics["grad_norm"] = grad_norm
  metrics["lr"] = schedule(state.step)
  metrics["nonfinite"] = flags
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def make_train_step(model, objectives, tx, schedule, state_shardings, batch_sharding,
                    accum_steps=1):
  """jit-compiles `train_step` with explicit shardings and a donated state."""
  fn = functools.partial(train_step, model=model, objectives=objectives, tx=tx,
                         schedule=schedule, accum_steps=accum_steps)
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
