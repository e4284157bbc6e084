"""Evaluation orchestration: which evaluators run, with what cfg, and their results.

`config.evals.NAME` holds the keys common to every evaluator (`config.EVAL_COMMON_KEYS`)
and the evaluator's own options (registered with it in `vlp_jax/evaluators/`).
`eval_configs(config)` resolves each enabled entry into the cfg its evaluator gets;
`run_evals(...)` runs them, logs each one's time and metrics, and returns
{'eval/NAME/METRIC': value}. The config is checked before (`evaluators.check_config`).
`main.py --mode=eval` writes them with `write_results` to `results_dir(...)`, never to
the training run's own metrics.jsonl.
"""
import contextlib
import json
import math
import time
from typing import Dict, Iterable, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath

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
              mesh=None, names: Optional[Iterable[str]] = None,
              rules=None) -> Dict[str, object]:
  """Runs the evaluators of `evals` (`eval_configs`; only `names` if given) on
  `params` under `mesh` and the logical-axis `rules` (the run's sharding rules:
  what caption decoding shards by); -> {'eval/NAME/METRIC': value}."""
  results = {}
  for name, cfg in evals.items():
    if names is not None and name not in names:
      continue
    fn = EVALUATORS.get(cfg.type)
    t0 = time.time()
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
          nn.logical_axis_rules(rules) if rules is not None else
          contextlib.nullcontext()):
      res = fn(predict_fns, params, cfg)
    logging.info("eval %s at step %d (%.1fs): %s", name, step, time.time() - t0,
                 ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in res.items()))
    results.update({f"eval/{name}/{k}": v for k, v in res.items()})
  return results


RESULTS_FILE = "results.json"


def results_dir(workdir: str, step: int, eval_dir: Optional[str] = None,
                from_init: bool = False) -> str:
  """Where eval mode writes: `eval_dir` if given, else WORKDIR/eval/step_STEP (or
  WORKDIR/eval/init_from for the parameters `config.init_from` names)."""
  if eval_dir:
    return eval_dir
  return str(epath.Path(workdir) / "eval" / ("init_from" if from_init else f"step_{step}"))


def _json_value(v):
  if isinstance(v, (str, bool)) or v is None:
    return v
  v = float(np.asarray(v))
  return v if math.isfinite(v) else str(v)


def write_results(directory: str, step: int, metrics: Dict[str, object], params_from: str,
                  config) -> str:
  """Writes DIRECTORY/results.json ({step, params_from, metrics, time}) and the config
  evaluated with (config.json), each atomically; -> the results path."""
  d = epath.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  results = {"step": int(step), "params_from": params_from, "time": time.time(),
             "metrics": {k: _json_value(v) for k, v in sorted(metrics.items())}}
  for name, obj in ((RESULTS_FILE, results), ("config.json", config_lib.to_dict(config))):
    tmp = d / (name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    tmp.rename(d / name)
  return str(d / RESULTS_FILE)


def read_results(directory: str) -> dict:
  """The results.json `write_results` wrote in `directory`."""
  return json.loads((epath.Path(directory) / RESULTS_FILE).read_text())

