"""Small JSON files the data tools write and the pipeline reads (curation indices,
reference-probability tables): atomic writes, format-checked reads, overwrite guard."""
import json
import os

from vlp_jax import errors


def write_atomic(path: str, obj, indent: int = 2, sort_keys: bool = False) -> None:
  """Writes `obj` as JSON to `path` atomically (a crash leaves the old or the new file)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys)
  os.replace(path + ".tmp", path)


def read_format(path: str, fmt: str, what: str, fix: str) -> dict:
  """The JSON object in `path`, whose 'format' must be `fmt`; a DataError naming
  `path`, the problem and `fix` (what to run instead) otherwise. `what` names the file
  kind, e.g. 'vlp_jax index file'."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{what} '{path}' is not valid JSON ({e}); {fix}.") from e
  if not isinstance(obj, dict) or obj.get("format") != fmt:
    raise errors.DataError(f"'{path}' is not a {what} (its 'format' must be '{fmt}'); "
                           f"{fix}.")
  return obj


def refuse_existing(paths, overwrite: bool) -> None:
  """ConfigError if any of `paths` exists and `overwrite` is off: a training run may
  read the output, so replacing it silently would change a resumed run's data."""
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise errors.ConfigError(
        f"{existing[0]} exists (a run may train on it); choose another output or pass "
        "--overwrite to replace it.")
