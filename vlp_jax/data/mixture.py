"""`config.data.mixture`: weighted source specs, e.g. from the command line

    --config.data.mixture="(('jsonl:/d/coco.jsonl', 0.7), ('wds:/d/cc-{000..099}.tar', 0.3))"
    --config.data.mixture=jsonl:/d/coco.jsonl=0.7 --config.data.mixture=arrayrecord:/d/x-*=0.3

(a tuple of (spec, weight) pairs or of 'SPEC=WEIGHT' strings: spec strings hold ':',
'/' and '.', which ml_collections does not allow in ConfigDict keys).

`check_config` holds the training data's checks that need no data (nor grain): the
mixture, config.data.captions_per_image against the batch, config.data.class_templates.
"""
import math
from typing import List, Tuple

from vlp_jax import errors
from vlp_jax.data import templates


def parse_mixture(value) -> List[Tuple[str, float]]:
  """-> [(spec, weight)]; [] when `value` is empty. Raises ConfigError naming the entry."""
  if not value:
    return []
  if isinstance(value, str):
    value = (value,)
  entries = []
  for entry in value:
    if isinstance(entry, str):
      spec, sep, weight = entry.rpartition("=")
      if not sep:
        raise errors.ConfigError(f"config.data.mixture entry '{entry}' has no weight; "
                                 "write 'SPEC=WEIGHT', e.g. 'jsonl:/d/a.jsonl=0.7'.")
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
      spec, weight = entry
    else:
      raise errors.ConfigError(f"config.data.mixture entry {entry!r} must be a (spec, "
                               "weight) pair or a 'SPEC=WEIGHT' string.")
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise errors.ConfigError(f"config.data.mixture entry {entry!r}: weight {weight!r} "
                               "is not a number.") from None
    if not isinstance(spec, str) or not spec:
      raise errors.ConfigError(f"config.data.mixture entry {entry!r}: the spec must be a "
                               "non-empty source string.")
    if not (weight > 0 and math.isfinite(weight)):
      raise errors.ConfigError(f"config.data.mixture entry {entry!r}: the weight must be "
                               "> 0 (and finite).")
    entries.append((spec, weight))
  return entries


def train_specs(data_cfg) -> List[Tuple[str, float]]:
  """The training sources: the mixture when set, else [(config.data.source, 1.0)]."""
  return parse_mixture(data_cfg.mixture) or [(data_cfg.source, 1.0)]


def check_captions_per_image(rows: int, per_process: int, process_count: int = 1,
                             global_batch: int = 0) -> None:
  """ConfigError unless `rows` (config.data.captions_per_image) divides the rows each
  process builds per batch (`per_process`)."""
  if per_process % rows == 0:
    return
  global_batch = global_batch or per_process * process_count
  unit = rows * process_count
  lower = global_batch // unit * unit
  options = " or ".join(str(b) for b in (lower, lower + unit) if b > 0)
  where = (f" / {process_count} processes = {per_process} rows per process"
           if process_count > 1 else "")
  raise errors.ConfigError(
      f"config.data.captions_per_image={rows} must divide the rows each process reads "
      f"per batch (config.batch_size={global_batch}{where}): the {rows} captions of an "
      f"image stay together in one process's rows. Use a config.batch_size that is a "
      f"multiple of {unit}, e.g. {options}, or a captions_per_image that divides "
      f"{per_process}.")


def check_config(config, process_count: int = 1) -> None:
  """The training data's checks that need no data: the mixture's entries,
  captions_per_image against the batch (of `process_count` processes; a batch that
  does not split over the processes is left to `batch_plan`) and class_templates.
  Raises ConfigError / DataPathError naming the key and the fix."""
  d = config.data
  parse_mixture(d.mixture)
  if config.batch_size % process_count == 0:
    check_captions_per_image(d.captions_per_image, config.batch_size // process_count,
                             process_count, config.batch_size)
  templates.check_class_templates(d.class_templates)
