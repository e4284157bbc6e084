"""Built-in class-name sets and the zero-shot evaluator's `classnames` option.

A set is keyed by its TFDS dataset name (index i = TFDS label i; `datasets.py` says
where each list comes from): imagenet (= imagenet2012, imagenet_v2,
imagenet2012_real, imagenet_sketch, imagenet_a, imagenet_r: TFDS labels all of them
with ImageNet's 1,000 labels), cifar10, cifar100, stl10, food101, oxford_iiit_pet,
oxford_flowers102, dtd, eurosat, caltech101, cars196, sun397, mnist, svhn_cropped,
resisc45, patch_camelyon; short aliases: pets, flowers102, cars, stanford_cars, svhn,
pcam.

The option (config.evals.NAME.classnames) is one of

  () / 'dataset'           the default: the eval source's own class names (an image
                           folder's names or classnames.txt, TFDS's label names, ...)
  'auto'                   the built-in set of a `tfds:` source's dataset when there is
                           one (e.g. CLIP's names for tfds:imagenet2012 instead of its
                           WordNet ids), 'imagenet' for a source whose 1,000 names are
                           WordNet ids (an ImageNet image folder), CLIP's ImageNet
                           names by WordNet id for a source whose names are other
                           ImageNet WordNet ids (e.g. an ImageNet-A or -R folder: 200),
                           else the source's own names
  'imagenet', 'cifar10'... a built-in set (`SETS`, `ALIASES`)
  '/path/names.txt'        a file: one name per line (blank lines skipped), or a
                           '.json' list
  ('cat', 'dog', ...)      the names themselves, in label order

A string is a one-element tuple (as `templates`; the command line gives tuples):
--config.evals.zeroshot.classnames=imagenet.
Whatever is chosen must have as many names as the source has classes.
"""
import difflib
import json
import os
import re
from typing import NamedTuple, Tuple

from vlp_jax import errors
from vlp_jax.data.classnames import datasets, imagenet

SETS = dict(imagenet=imagenet.IMAGENET, **datasets.SETS)
ALIASES = {
    "imagenet2012": "imagenet", "imagenet_v2": "imagenet",
    "imagenet2012_real": "imagenet", "imagenet1k": "imagenet",
    "imagenet_sketch": "imagenet", "imagenet_a": "imagenet", "imagenet_r": "imagenet",
    "pets": "oxford_iiit_pet", "flowers102": "oxford_flowers102",
    "cars": "cars196", "stanford_cars": "cars196",
    "svhn": "svhn_cropped", "pcam": "patch_camelyon",
}
DATASET = "dataset"
AUTO = "auto"


class ClassNames(NamedTuple):
  """Resolved class names; `origin` says where they came from (for the log)."""
  names: Tuple[str, ...]
  origin: str


def set_names() -> Tuple[str, ...]:
  """Every name a built-in set answers to (sets and aliases), sorted."""
  return tuple(sorted(set(SETS) | set(ALIASES)))


def builtin(name: str):
  """The built-in set called `name` (or an alias of it), or None."""
  return SETS.get(ALIASES.get(name, name))


def by_wordnet_id(wnids):
  """CLIP's ImageNet names of `wnids` (e.g. an ImageNet-A folder's 200 class folders),
  or None unless every one is an ImageNet WordNet id."""
  index = {w: i for i, w in enumerate(imagenet.IMAGENET_WNIDS)}
  if not wnids or not all(w in index for w in wnids):
    return None
  return ClassNames(tuple(imagenet.IMAGENET[index[w]] for w in wnids),
                    "built-in 'imagenet' by WordNet id (auto)")


def _is_path(value: str) -> bool:
  return value.endswith((".txt", ".json")) or "/" in value or os.sep in value


def _unknown(value, where) -> errors.ConfigError:
  close = difflib.get_close_matches(value, [DATASET, AUTO, *set_names()], n=1)
  hint = f" Did you mean '{close[0]}'?" if close else ""
  return errors.ConfigError(
      f"{where}={value!r} is not a class-name set. Use '{DATASET}' (the source's own "
      f"names, the default), '{AUTO}', a built-in set {list(set_names())}, a file "
      f"(a path ending in .txt, one name per line, or .json, a list) or a list of "
      f"names in label order.{hint}")


def read_file(path: str, where: str, error=errors.DataError) -> Tuple[str, ...]:
  """The names in `path`: one per line (blank lines skipped) or a JSON list."""
  if not os.path.isfile(path):
    raise errors.DataPathError(
        f"{where}: class names file not found: '{path}' (one name per line, or a "
        "JSON list in a .json file).")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      try:
        names = json.load(f)
      except json.JSONDecodeError as e:
        raise error(f"{where}: '{path}' is not valid JSON ({e}).") from None
      if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise error(f"{where}: '{path}' must hold a JSON list of strings.")
    else:
      names = [line.strip() for line in f if line.strip()]
  if not names:
    raise error(f"{where}: '{path}' holds no class names.")
  return tuple(names)


def check(value, where: str) -> None:
  """Validates the option without the data (type, set name, file)."""
  if isinstance(value, str):
    if value in ("", DATASET, AUTO) or builtin(value) is not None:
      return
    if _is_path(value):
      read_file(value, where, errors.ConfigError)
      return
    raise _unknown(value, where)
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    if len(value) == 1:  # A one-element tuple from the command line: a name or a file.
      check(value[0], where)
    return  # () is the default, 'dataset'.
  raise errors.ConfigTypeError(
      f"{where}={value!r} must be a string ('{DATASET}', '{AUTO}', a set name or a "
      "file) or a list of class names.")


def _tfds_dataset(source_spec: str):
  kind, _, arg = source_spec.partition(":")
  if kind != "tfds":
    return None
  return arg.split("?")[0].split(":")[0].split("/")[0]


def resolve(value, source_spec: str, source, where: str) -> ClassNames:
  """The class names for `value` (module docstring), checked against the number of
  classes of `source` (an eval source with `class_names`)."""
  check(value, where)
  own = getattr(source, "class_names", None)
  if isinstance(value, (list, tuple)) and len(value) <= 1:
    value = value[0] if value else DATASET
  if isinstance(value, str):
    if value in ("", DATASET):
      out = None
    elif value == AUTO:
      name = _tfds_dataset(source_spec)
      if not (name and builtin(name) is not None) and own is not None and (
          len(own) == 1000 and all(re.fullmatch(r"n\d{8}", n) for n in own)):
        name = "imagenet"  # An ImageNet folder: train/n01440764/...
      out = (ClassNames(builtin(name), f"built-in '{name}' (auto)")
             if name and builtin(name) is not None else by_wordnet_id(own))
    elif builtin(value) is not None:
      out = ClassNames(builtin(value), f"built-in '{value}'")
    else:
      out = ClassNames(read_file(value, where), f"file '{value}'")
  else:
    out = ClassNames(tuple(value), "config")
  if out is None:
    if own is None:
      raise errors.DataError(
          f"Eval source '{source_spec}' has no class names of its own; use a labelled "
          f"source (e.g. 'shapes:classes', 'tfds:cifar10:test', 'imagefolder:DIR') or "
          f"set {where} to a built-in set or a file.")
    return ClassNames(tuple(own), "the source")
  if own is not None and len(own) != len(out.names):
    raise errors.DataError(
        f"{where}: {out.origin} has {len(out.names)} class names but eval source "
        f"'{source_spec}' has {len(own)} classes; choose the set of that dataset "
        f"(built-in: {list(set_names())}) or '{DATASET}'.")
  return out

