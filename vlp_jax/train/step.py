"""The jitted train step: one forward pass, a weighted sum of objectives, an optax update."""
import functools

import jax
import jax.numpy as jnp
import optax

from vlp_jax.objectives import combine
from vlp_jax.train import accumulate, nonfinite, queue as queue_lib
from vlp_jax.train import teacher as teacher_lib

# A selected objective with its weight, options and declarations (reads, batch_keys,
# batch_global); see `vlp_jax/objectives/combine.py`.
WeightedObjective = combine.WeightedObjective


def objectives_from_config(config):
  """[WeightedObjective] for `config.objectives` (weights) / `config.objective_cfg`."""
  return combine.from_config(config)


def compute_loss(params, model, objectives, batch, rng, train=True, extra_outputs=None,
                 state_outputs=None):
  """Sum of weighted objectives on one forward pass -> (total, metrics).

  `extra_outputs` (e.g. the teacher's, `teacher.outputs`) and `state_outputs` (the
  queue's, `queue.outputs`) join the model's outputs."""
  combine.check_batch(objectives, batch)
  outputs = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
  outputs = dict(outputs, **(extra_outputs or {}), **(state_outputs or {}))
  return combine.weighted_loss(objectives, outputs, batch)


def gradients(params, model, objectives, batch, rng, accum_steps=1, extra_outputs=None,
              state_outputs=None):
  """(grads, metrics) of the weighted objectives on `batch`: one forward pass, or
  `accum_steps` micro-batches keeping every negative (see `accumulate.py`).
  `extra_outputs`: full-batch outputs computed without gradient (the teacher's);
  `state_outputs`: arrays from the train state that are not per example (the
  queue's), given whole to every objective that reads them."""
  if accum_steps > 1:
    return accumulate.accumulated_grads(params, model, objectives, batch, rng,
                                        accum_steps, extra_outputs=extra_outputs,
                                        state_outputs=state_outputs)
  return jax.grad(compute_loss, has_aux=True)(params, model, objectives, batch, rng,
                                              extra_outputs=extra_outputs,
                                              state_outputs=state_outputs)


def phased(objectives, step, phase_grads):
  """`phase_grads(active objectives)` with the objectives on at `step`: those whose
  `starts_at` <= step. Objectives that start late (`starts_at` > 0) split training into
  phases; `lax.switch` runs only the current phase's computation (each phase is
  compiled once, in the same executable), and an objective that is not on yet reports
  zeros for its metrics."""
  starts = sorted({o.starts_at for o in objectives if o.starts_at})
  if not starts:
    return phase_grads(list(objectives))
  branches = [functools.partial(phase_grads, [o for o in objectives if o.starts_at <= s])
              for s in [0] + starts]
  full = jax.eval_shape(branches[-1])

  def padded(branch):
    def run():
      grads, metrics = branch()
      metrics = {k: metrics[k] if k in metrics else jnp.zeros(v.shape, v.dtype)
                 for k, v in full[1].items()}
      return grads, metrics
    return run

  phase = sum((step >= s).astype(jnp.int32) for s in starts)
  return jax.lax.switch(phase, [padded(b) for b in branches])


def train_step(state, batch, *, model, objectives, tx, schedule, accum_steps=1,
               teacher_momentum=None, queue_entries=None):
  """One optimisation step; returns (new_state, metrics).

  With `accum_steps` > 1 the gradient is accumulated over that many micro-batches,
  keeping all negatives of the batch (see `accumulate.py`). A step with a non-finite
  loss or gradient leaves params, optimizer state and teacher unchanged (see
  `nonfinite.py`); `metrics['nonfinite']` holds its flags. The batch gains 'step' (the
  step being computed) for objectives whose targets follow a schedule over training.

  With a momentum teacher (`state.teacher`, see `teacher.py`) the objectives' declared
  'teacher_*' outputs come from a forward pass with the teacher's parameters, and the
  teacher moves towards the updated parameters with momentum
  `teacher_momentum(step)` (also in `metrics['teacher_momentum']`).

  With a memory queue (`state.queue`, see `queue.py`) the objectives read its rows as
  'queue/NAME', and this step's teacher outputs `queue_entries` ({queue name: teacher
  output}) are enqueued after the update.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  # Objectives that follow a schedule over training declare batch_keys=('step',).
  batch = dict(batch, step=state.step)
  queue_entries = dict(queue_entries or {})
  if (state.queue is None) != (not queue_entries):
    raise ValueError("Pass queue_entries (queue.entries(config)) to the train step "
                     "exactly when the state has a queue.")
  # The queue's teacher outputs, and the teacher outputs of the objectives that are
  # always on, come from one pass outside the phases below.
  always = [o for o in objectives if not o.starts_at]
  needed = teacher_lib.needed_outputs(always)
  needed += tuple(o for o in queue_entries.values() if o not in needed)
  extra = teacher_lib.outputs(model, state.params, state.teacher, batch, needed,
                              accum_steps)
  queue_out = queue_lib.outputs(state.queue)

  def phase_grads(active):
    """(grads, metrics) with only the `active` objectives (XLA drops the work of the
    others: their views, teacher outputs, masked passes)."""
    more = tuple(n for n in teacher_lib.needed_outputs(active) if n not in extra)
    late = teacher_lib.outputs(model, state.params, state.teacher, batch, more,
                               accum_steps)
    return gradients(state.params, model, active, batch, rng, accum_steps,
                     extra_outputs=dict(extra, **late), state_outputs=queue_out)

  grads, metrics = phased(objectives, state.step, phase_grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  teacher = state.teacher
  if teacher is not None:
    if teacher_momentum is None:
      raise ValueError("The state has a momentum teacher: pass teacher_momentum "
                       "(teacher.momentum_schedule(config)) to the train step.")
    momentum = teacher_momentum(state.step)
    teacher = teacher_lib.ema_update(teacher, params, momentum)
    metrics["teacher_momentum"] = momentum
  queue = state.queue
  if queue is not None:
    queue = queue_lib.enqueue(queue, {k: extra[o] for k, o in queue_entries.items()})
  grad_norm = optax.tree.norm(grads)
  flags = nonfinite.flags(metrics, grads, [o.name for o in objectives], grad_norm)
  params, opt_state, teacher, queue = nonfinite.guard(
      flags[0], (params, opt_state, teacher, queue),
      (state.params, state.opt_state, state.teacher, state.queue))
  metrics["grad_norm"] = grad_norm
  metrics["lr"] = schedule(state.step)
  metrics["nonfinite"] = flags
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            teacher=teacher, queue=queue)
  return new_state, metrics


def make_train_step(model, objectives, tx, schedule, state_shardings, batch_sharding,
                    accum_steps=1, teacher_momentum=None, queue_entries=None):
  """jit-compiles `train_step` with explicit shardings and a donated state.
  `teacher_momentum`: the momentum schedule when the state has a teacher;
  `queue_entries`: {queue name: teacher output} when it has a queue."""
  fn = functools.partial(train_step, model=model, objectives=objectives, tx=tx,
                         schedule=schedule, accum_steps=accum_steps,
                         teacher_momentum=teacher_momentum,
                         queue_entries=queue_entries)
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
