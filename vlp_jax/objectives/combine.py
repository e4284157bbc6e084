"""The weighted sum of the selected objectives, and what each one is given.

An objective is registered with what it reads (see `vlp_jax/registry.py`):
`reads` (model outputs), `batch_keys` (batch entries) and `batch_global` (whether
it needs every negative of the global batch). `from_config` turns
`config.objectives` / `config.objective_cfg` into `WeightedObjective` records that
carry these declarations, so the train step and gradient accumulation need no
further lookups.

`call` gives an objective exactly what it declares: a view of the outputs holding
its `reads` and of the batch holding its `batch_keys`. A declared entry that is
absent is an error naming the objective and the entry; reading an undeclared one is
an error too, in every code path (with or without accumulation), so a declaration
cannot silently fall out of step with the code.

`combine` sums the weighted losses and names the metrics: `NAME/METRIC` for each
objective's metrics, `loss` for the total, and the model's scalar outputs
`logit_scale` / `logit_bias` under their own names.
"""
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from vlp_jax import errors
from vlp_jax.registry import OBJECTIVES

# Model outputs reported as metrics of their own (when the model returns them).
SCALAR_METRICS = ("logit_scale", "logit_bias")


class WeightedObjective(NamedTuple):
  """A selected objective: its function, weight, options and declarations."""
  name: str
  fn: Callable
  weight: float
  cfg: Any
  reads: Tuple[str, ...] = ()
  batch_keys: Tuple[str, ...] = ()
  batch_global: bool = False
  starts_at: int = 0  # First step it is on (registered `starts_at`; 0 = always).


def from_registry(name: str, weight: float = 1.0, cfg=None) -> WeightedObjective:
  """The registered objective `name` with its declarations, weighted `weight`."""
  info = OBJECTIVES.info(name)
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  starts_at = int(info["starts_at"](cfg)) if info["starts_at"] is not None else 0
  return WeightedObjective(name, OBJECTIVES.get(name), float(weight), cfg,
                           tuple(info["reads"]), tuple(info["batch_keys"]),
                           bool(info["batch_global"]), max(starts_at, 0))


def options(config, name: str) -> dict:
  """`config.objective_cfg.NAME` as a dict; an objective that starts late (registered
  `starts_at`) gets `total_steps` = config.total_steps unless its options set it, so
  its start follows `--config.total_steps`."""
  cfg = config.objective_cfg.get(name, {})
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  if OBJECTIVES.info(name)["starts_at"] is not None and cfg.get("total_steps") is None:
    cfg["total_steps"] = int(config.total_steps)
  return cfg


def from_config(config) -> list:
  """WeightedObjectives for `config.objectives` (weights) / `config.objective_cfg`."""
  return [from_registry(name, weight, options(config, name))
          for name, weight in config.objectives.items()]


class InputError(errors.UserError, KeyError):
  """An objective's declared input is absent, or it read an undeclared one."""

  def __str__(self):  # KeyError would quote the message.
    return str(self.args[0]) if self.args else ""


class _View(dict):
  """The entries an objective declared; reading any other one is an InputError.
  A pytree like a dict (`jax.tree.map` over it keeps it a _View)."""

  def __init__(self, entries, objective, kind, declaration, available):
    super().__init__(entries)
    self._where = (objective, kind, declaration, tuple(sorted(available)))

  def __missing__(self, key):
    objective, kind, declaration, available = self._where
    raise InputError(
        f"Objective '{objective}' read the {kind} '{key}' without declaring it: add "
        f"it to {declaration}= in its OBJECTIVES.register(...) (available here: "
        f"{list(available)}).")


def _flatten_view(view):
  keys = tuple(sorted(view))
  return [view[k] for k in keys], (keys, view._where)  # pylint: disable=protected-access


def _unflatten_view(aux, children):
  keys, where = aux
  return _View(zip(keys, children), *where)


jax.tree_util.register_pytree_node(_View, _flatten_view, _unflatten_view)


def check_batch(objectives: Sequence[WeightedObjective], batch: Mapping) -> None:
  """Every batch key a selected objective declares is in `batch`."""
  for obj in objectives:
    for key in obj.batch_keys:
      if key not in batch:
        raise InputError(
            f"Objective '{obj.name}' needs the batch entry '{key}' (its batch_keys="
            f"{obj.batch_keys}), but the batch holds only {sorted(batch)}. Use data "
            f"that provides '{key}' or remove '{obj.name}' from config.objectives.")


def call(obj: WeightedObjective, outputs: Mapping, batch: Mapping):
  """`obj.fn` on the outputs it reads and the batch entries it declares -> (loss,
  metrics)."""
  check_batch([obj], batch)
  missing = [r for r in obj.reads if r not in outputs]
  if missing:
    raise InputError(
        f"Objective '{obj.name}' reads the model output '{missing[0]}', which the model "
        f"did not return (it returned {sorted(outputs)}). The batch may lack the "
        f"input that produces it, or the model does not produce it (see "
        f"vlp_jax.validation.validate).")
  out_view = _View({r: outputs[r] for r in obj.reads}, obj.name, "model output",
                   "reads", outputs)
  batch_view = _View({k: batch[k] for k in obj.batch_keys}, obj.name, "batch entry",
                     "batch_keys", batch)
  return obj.fn(out_view, batch_view, obj.cfg)


def combine(objectives: Sequence[WeightedObjective],
            results: Mapping[str, Tuple[Any, Dict[str, Any]]],
            outputs: Mapping,
            weights: Optional[Mapping[str, float]] = None):
  """Weighted total and named metrics of evaluated objectives.

  Args:
    objectives: the selected objectives (their order is the order of summation).
    results: objective name -> (loss, metrics), e.g. from `call`.
    outputs: model outputs; those named in `SCALAR_METRICS` become metrics.
    weights: per-objective weights replacing `obj.weight` (accumulation's 1/K).

  Returns:
    (total, metrics): the float32 sum of weight * loss, and
    {'NAME/METRIC': ..., 'loss': total, 'logit_scale': ..., 'logit_bias': ...}.
  """
  weights = weights or {}
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for obj in objectives:
    loss, m = results[obj.name]
    total = total + weights.get(obj.name, obj.weight) * loss
    metrics.update({f"{obj.name}/{k}": v for k, v in m.items()})
  metrics["loss"] = total
  for name in SCALAR_METRICS:
    if name in outputs:
      metrics[name] = outputs[name]
  return total, metrics


def weighted_loss(objectives: Sequence[WeightedObjective], outputs: Mapping,
                  batch: Mapping):
  """Every objective on the same outputs and batch -> (total, metrics) (`combine`)."""
  results = {obj.name: call(obj, outputs, batch) for obj in objectives}
  return combine(objectives, results, outputs)
