"""The momentum (EMA) teacher: an exponential moving average of chosen parameters.

`config.teacher.params` (regexes, full match, over '/'-joined parameter paths as for
`config.frozen`, e.g. `['img/.*', 'img_proj/.*']`; `['.*']` = every parameter) selects
what gets an EMA copy; `[]` (the default) means no teacher, and the train state and
step are exactly those of a run without one.

* State: `TrainState.teacher` holds the selected sub-tree of the parameters (same
  names, shapes, dtypes and logical axes, so the same shardings). It is created equal
  to the parameters, set again from the loaded parameters by `config.init_from`
  (`reset`), takes no part in the gradient or the optimizer, and is checkpointed and
  restored with the rest of the state.
* Update: after each optimizer update, inside the jitted step, every teacher leaf
  t <- m_k t + (1 - m_k) theta, computed as t + (1 - m_k)(theta - t) in float32 (so a
  frozen parameter's copy stays bitwise equal to it), where theta is the updated
  parameter and m_k the momentum at step k (`momentum_schedule`): 'constant' m, or
  'cosine' from m at step 0 to `final_momentum` at `total_steps` (BYOL, DINO):
  m_k = final - (final - m)(1 + cos(pi k / total_steps)) / 2. A step whose update is
  skipped as non-finite leaves the teacher unchanged too. Updating after the step is
  the same sequence as ALBEF/TCL's update before the next forward pass.
* Objectives read teacher outputs by declaring them: `reads=('teacher_image_emb',
  ...)` is the model's output 'image_emb' computed with the teacher's parameters
  (`outputs`). The step then runs one extra forward pass (train=False: no dropout, no
  patch dropout) with the parameters where the teacher holds a copy replaced by it and
  the others as they are, all under stop_gradient; only when some objective declares a
  teacher output. With gradient accumulation it runs per micro-batch.
* A frozen second model: momentum 1.0 ('constant') keeps the teacher bitwise as it
  started, and `config.teacher.init_from` (the keys of config.init_from; include []
  = `params`) loads it from another run's checkpoint at step 0 (`init_from.py`
  `load_teacher`; PRIOR's reference language model, configs/prior_coca_b16.py).
"""
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax import config as config_lib, errors
from vlp_jax.train import freeze

# A model output `NAME` computed with the teacher's parameters is `teacher_NAME`.
PREFIX = "teacher_"
SCHEDULES = config_lib.TEACHER_SCHEDULES  # 'constant', 'cosine'.


def patterns(config) -> list:
  """`config.teacher.params` ([] when absent: no teacher)."""
  teacher = config.get("teacher")
  return [] if teacher is None else list(teacher.params)


def enabled(config) -> bool:
  """Whether `config` asks for a teacher (`config.teacher.params` non-empty)."""
  return bool(patterns(config))


def student_name(output: str) -> str:
  """'teacher_image_emb' -> 'image_emb'; a name without the prefix is returned as is."""
  return output[len(PREFIX):] if output.startswith(PREFIX) else output


def is_teacher_output(name: str) -> bool:
  return name.startswith(PREFIX)


def needed_outputs(objectives) -> tuple:
  """The teacher outputs ('teacher_*') the objectives read, in declaration order."""
  names = []
  for obj in objectives:
    names.extend(r for r in obj.reads if is_teacher_output(r) and r not in names)
  return tuple(names)


def _is_box(x):
  return isinstance(x, nn.meta.AxisMetadata)


def select(params, patterns):
  """The sub-tree of `params` (nested dicts; flax partitioning boxes count as leaves)
  whose '/'-joined paths fully match a regex of `patterns`. A pattern matching nothing
  is a ConfigError."""
  patterns = list(patterns)
  names = list(freeze.named_leaves(params))
  for p in patterns:
    if not any(freeze.matches(n, [p]) for n in names):
      tower = (f" To select the whole '{p}' sub-tree use '{p}/.*'."
               if any(n.startswith(p + "/") for n in names) else "")
      raise errors.ConfigError(
          f"config.teacher.params pattern {p!r} matches no parameter (it must match a "
          f"whole '/'-joined path).{tower} Parameters look like: {names[:6]}.")

  def pick(tree, prefix):
    if isinstance(tree, Mapping) and not _is_box(tree):
      out = {}
      for k, v in tree.items():
        sub = pick(v, f"{prefix}{k}/")
        if sub is not None:
          out[k] = sub
      return out or None
    return tree if freeze.matches(prefix[:-1], patterns) else None

  return pick(params, "")


def like(params, teacher):
  """The leaves of `params` at the teacher's paths (a tree shaped like `teacher`)."""
  if isinstance(teacher, Mapping) and not _is_box(teacher):
    return {k: like(params[k], v) for k, v in teacher.items()}
  return params


def merged(params, teacher):
  """`params` with the leaves the teacher holds replaced by the teacher's."""
  if isinstance(teacher, Mapping) and not _is_box(teacher):
    return {k: merged(v, teacher[k]) if k in teacher else v for k, v in params.items()}
  return teacher


def init(params, patterns):
  """A new teacher: copies of the selected `params` (None when `patterns` is empty).
  Works on boxed parameters too (the copies keep their logical axes)."""
  if not list(patterns):
    return None
  return jax.tree.map(jnp.copy, select(params, patterns))


def momentum_schedule(config):
  """step -> float32 momentum m_k for `config.teacher` (None without a teacher)."""
  if not enabled(config):
    return None
  t, total = config.teacher, float(config.total_steps)
  base, final = float(t.momentum), float(t.final_momentum)

  def schedule(step):
    if t.schedule == "constant":
      return jnp.asarray(base, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / total, 0.0, 1.0)
    return jnp.asarray(final - (final - base) * 0.5 * (1.0 + jnp.cos(math.pi * frac)),
                       jnp.float32)
  return schedule


def ema_update(teacher, params, m):
  """Every teacher leaf t <- t + (1 - m)(theta - t) (= m t + (1 - m) theta), in
  float32, for the matching leaf theta of `params`."""
  m = jnp.asarray(m, jnp.float32)

  def update(t, p):
    t32 = t.astype(jnp.float32)
    new = (t32 + (1.0 - m) * (jax.lax.stop_gradient(p).astype(jnp.float32) - t32)
           ).astype(t.dtype)
    # m = 1 keeps t bitwise (t + 0 (theta - t) would turn -0.0 into +0.0 and a
    # non-finite theta into NaN): a frozen teacher (PRIOR's reference model).
    return jnp.where(m >= 1.0, t, new)
  return jax.tree.map(update, teacher, like(params, teacher))


def reset(state):
  """`state` with its teacher (if any) set to copies of its parameters, in the
  teacher's shardings (after `config.init_from` loaded new parameters)."""
  if state.teacher is None:
    return state
  shardings = jax.tree.map(lambda x: x.sharding, state.teacher)
  copy = jax.jit(lambda p, t: jax.tree.map(jnp.copy, like(p, t)),
                 out_shardings=shardings)
  return state.replace(teacher=copy(state.params, state.teacher))


def outputs(model, params, teacher, batch, names, accum_steps: int = 1):
  """{'teacher_NAME': model output NAME} for the teacher output `names`, from one
  forward pass (train=False) with `merged(params, teacher)` under stop_gradient.

  With `accum_steps` > 1 the pass runs per micro-batch (`accumulate.py`'s split) and
  the per-example outputs are put back in batch order; scalar ones are taken from
  the first micro-batch (the parameters are the same for all). {} when `names` is
  empty."""
  from vlp_jax.train import accumulate  # pylint: disable=g-import-not-at-top
  if not names:
    return {}
  if teacher is None:
    raise errors.ConfigError(
        f"An objective reads the teacher outputs {list(names)}, but the train state has "
        "no teacher: set config.teacher.params (e.g. ['.*'] or ['img/.*', "
        "'img_proj/.*']).")
  full = jax.lax.stop_gradient(merged(params, teacher))
  wanted = [student_name(n) for n in names]

  def forward(b):
    out = model.apply({"params": full}, b, train=False)
    missing = [w for w in wanted if w not in out]
    if missing:
      raise errors.ConfigError(
          f"The teacher output '{PREFIX}{missing[0]}' needs the model output "
          f"'{missing[0]}', which the model did not return (it returned "
          f"{sorted(out)}).")
    return {PREFIX + w: jax.lax.stop_gradient(out[w]) for w in wanted}

  if accum_steps <= 1:
    return forward(batch)
  per = jax.lax.map(forward, accumulate.split_microbatches(batch, accum_steps))
  return {k: v[0] if v.ndim == 1 else accumulate.merge_microbatches(v)
          for k, v in per.items()}
