"""Evaluation orchestration: which evaluators run, with what cfg, and their results.

`config.evals.NAME` holds the keys common to every evaluator (`config.EVAL_COMMON_KEYS`)
and the evaluator's own options (registered with it in `vlp_jax/evaluators/`).
`eval_configs(config)` resolves each enabled entry into the cfg its evaluator gets;
`run_evals(...)` runs them, logs each one's time and metrics, and returns
{'eval/NAME/METRIC': value}. The config is checked before (`evaluators.check_config`).
"""
import contextlib
import time
from typing import Dict, Iterable, Optional

import jax
from absl import logging

from vlp_jax import config as config_lib, evaluators
from vlp_jax.registry import EVALUATORS


def eval_config(name: str, entry, config) -> config_lib.ConfigDict:
  """The cfg the evaluator of `config.evals.NAME` gets: the entry over the defaults of
  the common keys and the evaluator's options, with `type` and `source` resolved
  ('' = the entry's name / config.data.source), plus `name` and `data` = config.data."""
  type_ = evaluators.entry_type(name, entry)
  cfg = config_lib.ConfigDict(dict(evaluators.defaults(type_), **dict(entry.items())))
  cfg.type = type_
  cfg.source = cfg.source or config.data.source
  cfg.name = name
  cfg.data = config.data
  return cfg


def eval_configs(config) -> Dict[str, config_lib.ConfigDict]:
  """name -> cfg (`eval_config`) of each enabled entry (every >= 0); `cfg.every` is its
  period in steps (0 = only at the end of training)."""
  out = {}
  for name, entry in config.evals.items():
    if entry.get("every", config_lib.EVAL_COMMON_KEYS["every"]) < 0:
      continue
    out[name] = eval_config(name, entry, config)
  return out


def run_evals(evals: Dict[str, config_lib.ConfigDict], predict_fns, params, step: int,
              mesh=None, names: Optional[Iterable[str]] = None) -> Dict[str, object]:
  """Runs the evaluators of `evals` (`eval_configs`; only `names` if given) on
  `params` under `mesh`; -> {'eval/NAME/METRIC': value}."""
  results = {}
  for name, cfg in evals.items():
    if names is not None and name not in names:
      continue
    fn = EVALUATORS.get(cfg.type)
    t0 = time.time()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      res = fn(predict_fns, params, cfg)
    logging.info("eval %s at step %d (%.1fs): %s", name, step, time.time() - t0,
                 ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in res.items()))
    results.update({f"eval/{name}/{k}": v for k, v in res.items()})
  return results
