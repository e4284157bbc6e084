"""`config.data.mixture`: weighted source specs, e.g. from the command line

    --config.data.mixture="(('jsonl:/d/coco.jsonl', 0.7), ('wds:/d/cc-{000..099}.tar', 0.3))"
    --config.data.mixture=jsonl:/d/coco.jsonl=0.7 --config.data.mixture=arrayrecord:/d/x-*=0.3

(a tuple of (spec, weight) pairs or of 'SPEC=WEIGHT' strings: spec strings hold ':',
'/' and '.', which ml_collections does not allow in ConfigDict keys).
"""
import math
from typing import List, Tuple

from vlp_jax import errors


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
