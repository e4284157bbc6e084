"""File-based sources: open_clip-style csv/tsv tables and ImageNet-style image folders.

Specs (ARG is everything after the first ':'):

  csv:/data/train.tsv
  csv:/data/x.csv?image_column=url&caption_column=caption&separator=;
  imagefolder:/data/imagenet/{split}

Options after '?' are URL-query style `key=value` pairs joined by '&' (values may be
percent-encoded, e.g. `separator=%09` for a tab; `tab`, `comma`, `semicolon` and
`pipe` are accepted too). A literal '{split}' in the path is replaced by the split the
caller asks for ('train', 'validation', ...), so one spec serves training and eval.
"""
import csv
import json
import os
import sys
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vlp_jax import errors
from vlp_jax.data import decode
from vlp_jax.registry import SOURCES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

_SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|",
               "space": " "}


def split_options(arg: str, source: str, allowed: Tuple[str, ...]) -> Tuple[str, Dict[str, str]]:
  """Splits 'PATH?k=v&k2=v2' into (PATH, {k: v}); unknown keys are an error."""
  path, sep, query = arg.partition("?")
  if not sep:
    return arg, {}
  options = {}
  for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
    if key not in allowed:
      raise errors.ConfigError(f"Unknown option '{key}' in {source} spec '{source}:{arg}'; "
                       f"allowed: {', '.join(allowed)}.")
    options[key] = value
  return path, options


def raise_if_directory(path: str, source: str, exts: Tuple[str, ...]) -> None:
  """Raises DataPathError when `path` (given to a source that reads one file) is a
  directory: the message says so and lists up to 5 of its files ending in `exts`."""
  if not os.path.isdir(path):
    return
  found = sorted(n for n in os.listdir(path) if n.lower().endswith(exts)
                 and os.path.isfile(os.path.join(path, n)))
  example = os.path.join(path, found[0] if found else "train" + exts[0])
  if found:
    listing = ", ".join(f"'{os.path.join(path, n)}'" for n in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    there = f" Its {'/'.join(exts)} files: {listing}{more}."
  else:
    there = f" It holds no {'/'.join(exts)} file."
  raise errors.DataPathError(
      f"Data path '{path}' is a directory; the {source} source reads one "
      f"{'/'.join(exts)} file. Pass a file inside it, e.g. "
      f"--config.data.source={source}:{example}.{there}")


def resolve_split(path: str, split: str) -> str:
  """Replaces a literal '{split}' in `path` with `split`."""
  return path.replace("{split}", split) if split else path


def load_rgb(path: str) -> np.ndarray:
  """Decodes the image file at `path` to uint8 [H, W, 3] (raises decode.BadRecord)."""
  return decode.load_image(path)


def read_image(path: str) -> bytes:
  """The encoded bytes of the image file at `path`, decoded later by the transform
  (at a reduced scale when its crops allow); raises decode.BadRecord
  ('missing_file' when absent, 'unreadable' when it cannot be read)."""
  return decode.read_file(path)


def _select(n: int, size: Optional[int]) -> np.ndarray:
  """`size` evenly spaced indices of range(n) (all of them when size is 0/None/>= n)."""
  if not size or size >= n:
    return np.arange(n)
  return np.linspace(0, n - 1, size).round().astype(np.int64)


# ------------------------------------------------------------------------------- csv


class CsvSource:
  """open_clip-style table: one row per image with an image path and a caption column.

  Relative image paths are resolved against the table's folder. The separator
  defaults to a tab for '.tsv' files and a comma otherwise.
  """

  def __init__(self, path: str, image_column: str = "filepath",
               caption_column: str = "title", separator: Optional[str] = None,
               size: int = 0):
    if not path:
      raise errors.ConfigError(
          "The csv source needs a path: 'csv:/path/to/train.csv' (options: "
          "'csv:/path/x.csv?image_column=filepath&caption_column=title&separator=,').")
    if not os.path.isfile(path):
      raise_if_directory(path, "csv", (".csv", ".tsv"))
      raise errors.DataPathError(
          f"Data file not found: '{path}'. Pass an existing table with "
          "--config.data.source=csv:/path/to/train.csv (or .tsv).")
    if separator is None:
      separator = "\t" if path.lower().endswith(".tsv") else ","
    separator = _SEPARATORS.get(separator, separator)
    if len(separator) != 1:
      raise errors.ConfigError(f"csv separator must be one character, got {separator!r} "
                       f"(for '{path}'); e.g. '?separator=tab' or '?separator=;'.")
    self.path = path
    root = os.path.dirname(os.path.abspath(path))
    csv.field_size_limit(sys.maxsize)
    self.records: List[Tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f, delimiter=separator)
      columns = reader.fieldnames or []
      missing = [c for c in (image_column, caption_column) if c not in columns]
      if missing:
        raise errors.DataError(
            f"Table '{path}' has no column {', '.join(repr(c) for c in missing)} "
            f"(columns found with separator {separator!r}: {columns}). Name the columns "
            f"with 'csv:{path}?image_column=NAME&caption_column=NAME' (and "
            "'&separator=...' if the columns are not split correctly).")
      for row in reader:
        if size and len(self.records) >= size:
          break
        image, caption = row[image_column], row[caption_column]
        if not image:
          raise errors.DataError(
              f"{path}:{reader.line_num}: empty '{image_column}' value.")
        self.records.append((os.path.join(root, image), caption or ""))
    if not self.records:
      raise errors.DataError(f"Data file '{path}' holds no records.")

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i) -> Dict[str, Any]:
    path, caption = self.records[i]
    return {"image": read_image(path), "text": caption, "key": path}


@SOURCES.register("csv")
def make_csv_source(path, split="train", size=0, image_column=None, caption_column=None,
                    separator=None, **unused):
  """'csv:PATH[?image_column=..&caption_column=..&separator=..]'; kwargs win over ARG."""
  path, options = split_options(path or "", "csv",
                                ("image_column", "caption_column", "separator"))
  return CsvSource(resolve_split(path, split),
                   image_column=image_column or options.get("image_column", "filepath"),
                   caption_column=caption_column or options.get("caption_column", "title"),
                   separator=separator or options.get("separator"), size=size)


# ----------------------------------------------------------------------- imagefolder


class ImageFolderSource:
  """ImageNet layout: DIR/<class folder>/**/<image>; labels index the sorted folders.

  Class names are the folder names with '_' -> ' ', or come from DIR/classnames.txt
  (one per line, in sorted-folder order) or DIR/classnames.json ({folder: name}).
  `root` is DIR: prompt templates are read from DIR/templates.txt when there is one
  (vlp_jax/data/templates.py), by the zero-shot evaluator and, since this is a
  classification source (`classification`), by training, which turns each label
  into a prompt caption (config.data.class_templates).
  With `size`, an evenly spaced subset of the (class-sorted) images is kept, so every
  class stays represented.
  """

  classification = True  # Training batches: label 1 + class, a prompt caption.

  def __init__(self, root: str, size: int = 0):
    if not root:
      raise errors.ConfigError(
          "The imagefolder source needs a folder: 'imagefolder:/data/train'.")
    if not os.path.isdir(root):
      what = "is a file, not a folder" if os.path.exists(root) else "not found"
      raise errors.DataPathError(
          f"Image folder {what}: '{root}'. Pass a folder with one sub-folder per "
          "class, e.g. --config.data.source=imagefolder:/data/imagenet/{split}.")
    self.root = root
    self.class_folders = sorted(
        d for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not self.class_folders:
      raise errors.DataError(f"Image folder '{root}' has no class sub-folders; expected "
                       f"'{root}/<class name>/<image>.jpg'.")
    self.class_names = self._load_class_names()
    records = []
    for label, folder in enumerate(self.class_folders):
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
        dirnames.sort()
        for name in sorted(filenames):
          if name.lower().endswith(IMAGE_EXTENSIONS):
            records.append((os.path.join(dirpath, name), label))
    if not records:
      raise errors.DataError(f"Image folder '{root}' has {len(self.class_folders)} class "
                       f"folders but no images ({', '.join(IMAGE_EXTENSIONS)}).")
    self.records = [records[i] for i in _select(len(records), size)]

  def _load_class_names(self) -> List[str]:
    txt = os.path.join(self.root, "classnames.txt")
    js = os.path.join(self.root, "classnames.json")
    if os.path.isfile(txt):
      with open(txt, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
      if len(names) != len(self.class_folders):
        raise errors.DataError(f"'{txt}' lists {len(names)} names for "
                         f"{len(self.class_folders)} class folders; write one name per "
                         "line, in sorted-folder order.")
      return names
    if os.path.isfile(js):
      with open(js, encoding="utf-8") as f:
        mapping = json.load(f)
      missing = [d for d in self.class_folders if d not in mapping]
      if missing:
        raise errors.DataError(f"'{js}' has no name for class folders {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}.")
      return [str(mapping[d]) for d in self.class_folders]
    return [d.replace("_", " ") for d in self.class_folders]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i) -> Dict[str, Any]:
    path, label = self.records[i]
    return {"image": read_image(path), "text": self.class_names[label], "label": label,
            "key": path}


@SOURCES.register("imagefolder")
def make_imagefolder_source(path, split="train", size=0, **unused):
  return ImageFolderSource(resolve_split(path, split), size)
