"""A curated subset of another source: 'index:/runs/curated/index.json'.

The index file (written by `write_index`, e.g. by tools/curate.py) is a small JSON
header naming what it selects from, beside a .npy of record indices:

  {"format": "vlp_jax.index/1", "source": "shapes:hard+noisy=0.3", "split": "train",
   "source_size": 20000, "seed": 0, "count": 10000, "indices": "index.npy",
   "sha256": "...", "rules": [...what chose them...]}

("sha256": of the indices as little-endian int64, checked on reading when present.)

`IndexSource` wraps the named source (built with the header's split, size and seed, so
the indices mean the records they meant when written; the image size is the caller's)
and its record i is the wrapped source's record indices[i]. Being a plain random-
access source, it keeps every guarantee of the training pipeline (seeded shuffling,
per-process rows, worker-count invariance, exact resume). `config.data.size` keeps the
first `size` entries. A split other than the header's (e.g. an evaluator reading
config.data.source's 'validation') is the wrapped source's split, unfiltered; but
training (split 'train') on an index written for another split is a DataError.
"""
import hashlib
import os
from typing import Any, Dict

import numpy as np
from absl import logging

from vlp_jax import errors
from vlp_jax.data import json_files
from vlp_jax.registry import SOURCES

FORMAT = "vlp_jax.index/1"
_REQUIRED = ("source", "split", "source_size", "seed", "count", "indices")


def checksum(indices) -> str:
  """sha256 hex digest of `indices` as little-endian int64."""
  data = np.ascontiguousarray(np.asarray(indices, "<i8")).tobytes()
  return hashlib.sha256(data).hexdigest()


def check_writable(path: str, overwrite: bool = False) -> None:
  """FileExistsError-free guard: a ConfigError if the index `path` (or its .npy)
  exists and `overwrite` is off (a training run may read it)."""
  json_files.refuse_existing(
      (path, os.path.splitext(os.path.abspath(path))[0] + ".npy"), overwrite)


def write_index(path: str, indices, source: str, split: str, source_size: int,
                seed: int, overwrite: bool = False, **extra) -> str:
  """Writes `path` (JSON header) and its indices (.npy beside it, same stem);
  `extra` (e.g. rules, counts) goes into the header. ConfigError if they exist,
  unless `overwrite`. Returns `path`."""
  check_writable(path, overwrite)
  indices = np.asarray(indices, np.int64).reshape(-1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  stem = os.path.splitext(os.path.basename(path))[0]
  npy = stem + ".npy"
  np.save(os.path.join(os.path.dirname(os.path.abspath(path)), npy), indices)
  header = dict(format=FORMAT, source=source, split=split, source_size=int(source_size),
                seed=int(seed), count=int(len(indices)), indices=npy,
                sha256=checksum(indices), **extra)
  json_files.write_atomic(path, header)
  return path


def read_index(path: str):
  """(header dict, indices [count] int64) of an index file; DataPathError /
  DataError naming the file and the problem."""
  if not path:
    raise errors.ConfigError("The index source needs a file: 'index:/path/index.json' "
                             "(written by tools/curate.py).")
  if not os.path.isfile(path):
    raise errors.DataPathError(
        f"Index file not found: '{path}'. Pass the index.json that tools/curate.py "
        "wrote, e.g. --config.data.source=index:/runs/curated/index.json.")
  header = json_files.read_format(path, FORMAT, "vlp_jax index file",
                                  "write it with tools/curate.py")
  missing = [k for k in _REQUIRED if k not in header]
  if missing:
    raise errors.DataError(f"Index file '{path}' lacks {missing}; rewrite it with "
                           "tools/curate.py.")
  npy = os.path.join(os.path.dirname(os.path.abspath(path)), header["indices"])
  try:
    indices = np.load(npy, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise errors.DataError(f"Cannot read the indices of '{path}' from '{npy}' ({e}); "
                           "keep the .npy beside its JSON header.") from e
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise errors.DataError(f"'{npy}' must hold a 1-D integer array, got {indices.dtype} "
                           f"{indices.shape}.")
  if len(indices) != header["count"]:
    raise errors.DataError(f"'{npy}' holds {len(indices)} indices but '{path}' says "
                           f"count={header['count']}: the files do not belong together.")
  if "sha256" in header and checksum(indices) != header["sha256"]:
    raise errors.DataError(f"'{npy}' does not match the checksum in '{path}': the "
                           "indices changed after the header was written; rewrite "
                           "them with tools/curate.py.")
  return header, indices.astype(np.int64)


class IndexSource:
  """Record i = `base[indices[i]]` (see the module docstring)."""

  def __init__(self, base, indices: np.ndarray, path: str = ""):
    n = len(base)
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
      bad = int(indices.min() if indices.min() < 0 else indices.max())
      raise errors.DataError(
          f"Index file '{path}' selects record {bad}, but its source holds {n} records "
          "(indices must be in [0, {}]); was it written for another source size or "
          "seed? Re-run tools/curate.py on this source.".format(n - 1))
    if not len(indices):
      raise errors.DataError(f"Index file '{path}' selects no records.")
    self.base, self.indices, self.path = base, indices, path

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i) -> Dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self.indices):
      raise IndexError(f"index {i} out of range for {len(self.indices)} records.")
    return self.base[int(self.indices[i])]

  def __getattr__(self, name):  # class_names, classification, ...
    if name.startswith("__") or name == "base":  # Unpickling in worker processes.
      raise AttributeError(name)
    return getattr(self.base, name)

  def __repr__(self) -> str:
    return f"IndexSource({self.path!r}, {len(self)} of {self.base!r})"


@SOURCES.register("index")
def make_index_source(path, split="train", size=0, image_size=224, **unused):
  """'index:PATH' -> IndexSource (its split), else the wrapped source's `split`."""
  from vlp_jax.data import sources  # pylint: disable=g-import-not-at-top
  header, indices = read_index(path)
  if header["source"].partition(":")[0] == "index":
    raise errors.DataError(f"Index file '{path}' wraps another index source; curate "
                           "the original source instead.")
  if split != header["split"]:
    if split == "train":
      raise errors.DataError(
          f"Index file '{path}' selects records of split '{header['split']}', but "
          "training reads split 'train'; curate the training split (tools/curate.py "
          "--split=train).")
    logging.info("index:%s selects records of split '%s'; split '%s' is read from "
                 "'%s' unfiltered.", path, header["split"], split, header["source"])
    return sources.make_source(header["source"], split, size, header["seed"], image_size)
  base = sources.make_source(header["source"], split, header["source_size"],
                             header["seed"], image_size)
  if len(base) != header["source_size"] and header["source_size"]:
    raise errors.DataError(
        f"Index file '{path}' was written for {header['source_size']} records of "
        f"'{header['source']}' ({split}), which now holds {len(base)}; re-run "
        "tools/curate.py on the source as it is.")
  if size:
    indices = indices[:size]
  return IndexSource(base, indices, path)
