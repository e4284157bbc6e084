"""Evaluators: `fn(predict_fns, params, cfg) -> metrics`, registered by name.

An entry `config.evals.NAME` holds the keys common to every evaluator
(`config.EVAL_COMMON_KEYS`: type, every, source, split, size, batch_size; read by
`train/evaluation.py`) and the evaluator's own options, which it registers with their
defaults and checks itself:

    @EVALUATORS.register("zeroshot", options={"templates": ()}, check=check)
    def zeroshot(predict_fns, params, cfg): ...   # cfg.templates, cfg.batch_size, ...

The evaluator's `cfg` is its entry over those defaults, with `type` and `source`
resolved, plus `name` (the entry's) and `data` (config.data); see train/evaluation.py.
`check(cfg, where)` gets the entry with every default filled and raises a
`vlp_jax.errors` Config error naming `where + '.KEY'`. Importing this package imports
no data stack (grain): evaluators load their data when they run.
"""
import difflib
from typing import Any, Dict

from vlp_jax import config as config_lib, errors
from vlp_jax.evaluators import captioning, fewshot, linear_probe, retrieval, zeroshot  # pylint: disable=unused-import
from vlp_jax.registry import EVALUATORS

# Keys that entries no longer take, with what to do instead.
REMOVED_KEYS = {}


def entry_type(name: str, entry) -> str:
  """The evaluator an entry selects: its `type`, or else its name."""
  return entry.get("type") or name


def defaults(type_: str) -> Dict[str, Any]:
  """Every key an entry for evaluator `type_` takes, with its default: the common keys
  and the evaluator's options."""
  options = EVALUATORS.info(type_)["options"]
  clash = sorted(set(options) & set(config_lib.EVAL_COMMON_KEYS))
  if clash:
    raise TypeError(f"Evaluator '{type_}' declares options {clash}, which are keys "
                    "common to every evaluator (config.EVAL_COMMON_KEYS); rename them.")
  return dict(config_lib.EVAL_COMMON_KEYS, type=type_, **options)


def _unknown_key(key, where, type_, options):
  common = config_lib.EVAL_COMMON_KEYS
  owners = [n for n in EVALUATORS.names() if key in EVALUATORS.info(n)["options"]]
  match = difflib.get_close_matches(key, list(common) + list(options), n=1, cutoff=0.5)
  if key in REMOVED_KEYS:
    hint = f" '{key}' was removed: {REMOVED_KEYS[key]}."
  elif owners:
    hint = f" '{key}' is an option of {owners}, not of '{type_}'."
  else:
    hint = f" Did you mean '{match[0]}'?" if match else ""
  return errors.ConfigKeyError(
      f"Unknown key '{where}.{key}' for evaluator '{type_}'.{hint} Valid keys: the "
      f"common {sorted(common)} and {type_}'s options {sorted(options)}.")


def check_entry(name: str, entry) -> None:
  """Checks `config.evals.NAME`: a registered evaluator, no unknown keys, the common
  keys' types and ranges, then the evaluator's own check of its options."""
  where = f"config.evals.{name}"
  if not hasattr(entry, "keys"):
    raise errors.ConfigTypeError(f"'{where}' must be a group of keys (e.g. "
                                 f"configs/common.py:eval_entry), got {entry!r}.")
  type_ = entry_type(name, entry)
  if not isinstance(type_, str):
    raise errors.ConfigTypeError(f"'{where}.type' must be a string, got {type_!r}.")
  try:
    info = EVALUATORS.info(type_)
  except errors.ConfigKeyError as e:
    how = "" if entry.get("type") else " (without 'type', the entry's name is the evaluator)"
    raise errors.ConfigKeyError(f"{where}{how}: {e}") from None
  schema = defaults(type_)
  for key in entry.keys():
    if key not in schema:
      raise _unknown_key(key, where, type_, info["options"])
  config_lib.check_keys(entry, config_lib.ConfigDict(schema), where)  # Types.
  config_lib.check_numbers(entry, where, config_lib.EVAL_RANGES)
  if info["check"] is not None:
    cfg = config_lib.ConfigDict(dict(schema, **dict(entry.items())))
    info["check"](cfg, where)


# Evaluators that compare image and text embeddings: the model must produce both.
EMBEDDING_EVALUATORS = ("zeroshot", "retrieval")


def check_config(config) -> None:
  """Each entry of `config.evals` names a registered evaluator with valid options, and
  image-text evaluators run only on models with a contrastive head."""
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  produced = models.output_names(config.model)
  for name, entry in config.evals.items():
    check_entry(name, entry)
    kind = entry.get("type", name)
    if entry_type(name, entry) == "captioning":
      captioning.check_max_len(entry, config.model, f"config.evals.{name}")
    if kind in EMBEDDING_EVALUATORS and not {"image_emb", "text_emb"} <= produced:
      switch = models.output_switch(config.model.name, "image_emb")
      raise errors.ConfigError(
          f"config.evals.{name} ({kind}) compares image and text embeddings, but model "
          f"'{config.model.name}' has no contrastive head under this config"
          + (f" (set {switch})" if switch else "") + ": turn it on, or evaluate with "
          "'linear_probe' / 'fewshot' (frozen image features) instead.")
