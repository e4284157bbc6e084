"""Prompt templates: built-in sets, the user's own list, or a templates file.

Used by the zero-shot evaluator (option `templates`, config.evals.NAME.templates) to
embed class names, and by the training pipeline (config.data.class_templates) to turn
the labels of classification sources into captions. A value is one of

  () / 'auto'                 the default: DIR/templates.txt of an `imagefolder:DIR`
                              source if there is one, else the source's own
                              `default_templates` (a built-in set's name), else the
                              built-in set of the source's kind (SOURCE_DEFAULTS:
                              'shapes' for shapes), else 'imagenet'
  ('imagenet',) / 'imagenet'  a built-in set (BUILTIN): 'clip80' (CLIP's 80 ImageNet
                              templates), 'simple' (open_clip's 7), 'imagenet' (10 of
                              the 80), 'shapes', and CLIP's templates of each dataset
                              with a class-name set ('cifar10', 'food101', 'pets', ...;
                              vlp_jax/data/classnames/prompts.py)
  ('/path/templates.txt',)    a file: one template per line; blank lines and lines
                              starting with '#' are skipped
  ('a photo of a {}.', ...)   the templates themselves

Each template holds exactly one '{}', where the class name goes. On the command line:
--config.evals.zeroshot.templates=imagenet, or ="('a photo of a {}.', 'a {}.')";
--config.data.class_templates=shapes (or a .txt path). Nothing here imports grain.
"""
import difflib
import os
import re
import string
from typing import List, NamedTuple, Sequence, Tuple

from vlp_jax import errors
from vlp_jax.data import classnames
from vlp_jax.data.classnames import prompts

# CLIP's zero-shot ImageNet templates (a subset of the 80).
IMAGENET: Tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a good photo of the {}.",
    "itap of a {}.",
)
# For the built-in shapes data; every word is in its word tokenizer's vocabulary
# (`words:shapes`), and "a" becomes "an" before a vowel ("an orange cross").
SHAPES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a {} on a plain background.",
    "an image showing a {}.",
    "a picture of a {}.",
    "a simple drawing of a {}.",
    "a {}.",
)
BUILTIN = {"imagenet": IMAGENET, "shapes": SHAPES, "clip80": prompts.CLIP80,
           "simple": prompts.SIMPLE, **prompts.DATASETS,
           **{a: prompts.DATASETS[n] for a, n in classnames.ALIASES.items()
              if n in prompts.DATASETS}}
_FIX_ARTICLES = ("shapes",)  # Built-in sets whose prompts get "a" -> "an" before a vowel.
# Source kind (the spec before ':') -> its built-in set when `templates` is () and the
# source names none itself (a `default_templates` attribute).
SOURCE_DEFAULTS = {"shapes": "shapes"}
AUTO = "auto"  # config.data.class_templates' spelling of the default ().
CLASS_TEMPLATES_KEY = "config.data.class_templates"
DEFAULT = "imagenet"
FILE_NAME = "templates.txt"  # Looked for in an imagefolder's root, beside classnames.txt.

_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


class Templates(NamedTuple):
  """Resolved templates; `origin` says where they came from (for the log)."""
  templates: Tuple[str, ...]
  origin: str
  fix_articles: bool = False

  def prompts(self, class_name: str) -> List[str]:
    """Every template filled with `class_name`, in order."""
    out = [t.format(class_name) for t in self.templates]
    return [_A_BEFORE_VOWEL.sub("an ", p) for p in out] if self.fix_articles else out


def as_tuple(value, where: str) -> Tuple[str, ...]:
  """The option's value as a tuple of strings (a string is a one-element tuple)."""
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(value)
  raise errors.ConfigTypeError(
      f"{where}={value!r} must be a list of templates with '{{}}' (e.g. "
      f"['a photo of a {{}}.']), a built-in set {sorted(BUILTIN)} or a templates file.")


def template_problem(template: str):
  """Why `template` is not a valid template (None if it is)."""
  try:
    fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
              if f is not None]
  except ValueError as e:
    return f"it has an unmatched brace ({e}); write a literal brace as '{{{{' or '}}}}'"
  if fields != [("", "", None)]:
    if len(fields) == 1:
      f, spec, conv = fields[0]
      found = f"the field {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
    else:
      found = f"{len(fields)} fields" if fields else "no '{}'"
    return (f"it has {found}; it needs exactly one '{{}}' where the class name goes, "
            "e.g. 'a photo of a {}.'")
  return None


def check_templates(templates: Sequence[str], where: str, error=errors.ConfigError):
  """Raises `error` naming the first bad template (or the empty list)."""
  if not templates:
    raise error(f"{where} holds no templates; give at least one, e.g. "
                "'a photo of a {}.'.")
  for t in templates:
    problem = template_problem(t)
    if problem:
      raise error(f"{where}: template {t!r} is invalid: {problem}.")


def _is_path(value: str) -> bool:
  return value.endswith(".txt") or os.sep in value or "/" in value


def read_file(path: str, where: str, error=errors.DataError) -> Tuple[str, ...]:
  """The templates of a file (one per line; blank and '#' lines skipped), checked."""
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\r\n") for line in f]
  templates = tuple(line for line in lines if line.strip() and
                    not line.lstrip().startswith("#"))
  check_templates(templates, f"{where} (file '{path}')", error)
  return templates


def check(value, where: str) -> None:
  """Validates the option without the data: types, each template, set names, files."""
  items = as_tuple(value, where)
  if not items:
    return  # The default.
  if len(items) == 1 and template_problem(items[0]) and "{" not in items[0]:
    name = items[0]
    if name in BUILTIN:
      return
    if _is_path(name):
      if not os.path.isfile(name):
        raise errors.DataPathError(
            f"{where}: templates file not found: '{name}' (a local text file, one "
            "template with '{}' per line).")
      read_file(name, where, errors.ConfigError)
      return
    close = difflib.get_close_matches(name, list(BUILTIN), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise errors.ConfigError(
        f"{where}={value!r}: '{name}' is not a built-in template set {sorted(BUILTIN)}, "
        f"a templates file (a path ending in .txt) or a template (one '{{}}' where the "
        f"class name goes, e.g. 'a photo of a {{}}.').{hint}")
  check_templates(items, where)


def resolve(value, source_spec: str, source, where: str) -> Templates:
  """The templates for `value` (see the module docstring) and the eval source."""
  check(value, where)
  items = as_tuple(value, where)
  if not items:
    root = getattr(source, "root", None)
    path = os.path.join(root, FILE_NAME) if isinstance(root, str) else None
    if path and os.path.isfile(path):
      return Templates(read_file(path, where), f"file '{path}'")
    kind = source_spec.partition(":")[0]
    name = getattr(source, "default_templates", None)
    if name not in BUILTIN:
      name = SOURCE_DEFAULTS.get(kind, DEFAULT)
    return Templates(BUILTIN[name], f"built-in '{name}' (default)", name in _FIX_ARTICLES)
  if len(items) == 1 and items[0] in BUILTIN:
    return Templates(BUILTIN[items[0]], f"built-in '{items[0]}'",
                     items[0] in _FIX_ARTICLES)
  if len(items) == 1 and template_problem(items[0]):
    return Templates(read_file(items[0], where), f"file '{items[0]}'")
  return Templates(items, "config")


def _class_value(value):
  return () if value == AUTO else value


def check_class_templates(value) -> None:
  """Validates config.data.class_templates without the data (ConfigError naming it)."""
  if isinstance(value, str) and value != AUTO and "{" not in value and (
      value not in BUILTIN and not _is_path(value)):
    close = difflib.get_close_matches(value, [AUTO, *BUILTIN], n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise errors.ConfigError(
        f"{CLASS_TEMPLATES_KEY}={value!r} is not '{AUTO}', a built-in template set "
        f"{sorted(BUILTIN)}, a templates file (a path ending in .txt, one template with "
        f"'{{}}' per line) or a template with one '{{}}' where the class name goes.{hint}")
  check(_class_value(value), CLASS_TEMPLATES_KEY)


def class_templates(value, source_spec: str, source) -> Templates:
  """The prompt templates of classification source `source_spec` for training
  (config.data.class_templates: 'auto' resolves as the zero-shot default does)."""
  return resolve(_class_value(value), source_spec, source,
                 f"{CLASS_TEMPLATES_KEY} (for '{source_spec}')")
