"""Evaluators: `fn(predict_fns, params, cfg) -> metrics`, registered by name."""
from vlp_jax import config as config_lib
from vlp_jax.evaluators import captioning, retrieval, zeroshot  # pylint: disable=unused-import
from vlp_jax.registry import EVALUATORS


def check_config(config) -> None:
  """Each entry of `config.evals` names a registered evaluator with valid options."""
  for name, ev in config.evals.items():
    config_lib.check_keys(ev, config_lib.ConfigDict(config_lib.EVAL_KEYS),
                          f"config.evals.{name}")
    EVALUATORS.get(ev.get("type", name))
    config_lib._check_numbers(ev, f"config.evals.{name}", config_lib.EVAL_RANGES)  # pylint: disable=protected-access
