"""Train state, created directly in its final sharding."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import sharding
from vlp_jax.train import queue as queue_lib, teacher as teacher_lib


@dataclasses.dataclass(frozen=True)
class TrainState:
  """step, params, optimizer state, base RNG key (per-step keys are fold_in(rng,
  step)), the momentum teacher (`teacher.py`) and the memory queue (`queue.py`); each
  of the last two is None without one.

  A pytree whose children are named by attribute; without a teacher and a queue it
  has exactly the four children it had before they existed, so older checkpoints
  restore.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  teacher: Any = None
  queue: Any = None

  def replace(self, **updates) -> "TrainState":
    return dataclasses.replace(self, **updates)


_FIELDS = ("step", "params", "opt_state", "rng")


def _optional(state):
  return tuple(n for n in ("teacher", "queue") if getattr(state, n) is not None)


def _flatten_with_keys(state):
  optional = _optional(state)
  return ([(jax.tree_util.GetAttrKey(n), getattr(state, n))
           for n in _FIELDS + optional], optional)


def _unflatten(optional, children):
  children = list(children)
  return TrainState(*children[:4], **dict(zip(optional, children[4:])))


jax.tree_util.register_pytree_with_keys(TrainState, _flatten_with_keys, _unflatten)


def dummy_batch(config, batch_size: int = 1):
  """A zero batch with the shapes the model expects (for init and benchmarks)."""
  s = config.data.image_size
  return {
      "image": np.zeros((batch_size, s, s, 3), np.float32),
      "text": np.zeros((batch_size, config.model.text.context_length), np.int32),
  }


def _init_fn(model, tx, config):
  def init(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng},
                           dummy_batch(config), train=False)
    params = variables["params"]
    teacher = teacher_lib.init(params, teacher_lib.patterns(config))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng, teacher=teacher,
                      queue=queue_lib.init(config))
  return init


def abstract_state(model, tx, config, mesh):
  """(abstract boxed state, its NamedShardings) without allocating anything."""
  boxed = jax.eval_shape(_init_fn(model, tx, config), jax.random.PRNGKey(0))
  rules = sharding.rules_from_config(config.sharding_rules)
  return boxed, sharding.logical_shardings(boxed, mesh, rules)


def create_state(model, tx, config, mesh, shardings=None) -> TrainState:
  """Initialises params and optimizer state directly with their mesh shardings
  (`shardings`: the boxed ones `abstract_state` returns, to skip tracing the
  initialiser again)."""
  if shardings is None:
    _, shardings = abstract_state(model, tx, config, mesh)
  init = jax.jit(_init_fn(model, tx, config), out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init(jax.random.PRNGKey(config.seed))
  return nn.meta.unbox(state)


def unboxed_abstract_state(model, tx, config, mesh, abstract=None):
  """ShapeDtypeStructs with target shardings, for restoring a checkpoint
  (`abstract`: `abstract_state`'s result, when already computed)."""
  boxed, shardings = abstract or abstract_state(model, tx, config, mesh)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
