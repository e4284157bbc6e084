"""PRIOR's precomputed reference probabilities as a batch field (config.data.ref_probs).

A table (a folder, written by tools/prior_probs.py) maps each tokenised caption of a
source to its reference-model probabilities:

    meta.json       format, tokenizer, context_length (checked at start-up), rows,
                    sha256 of the three arrays (provenance; not re-hashed on load)
    keys.npy        uint64 [N] sorted row keys (`row_keys`)
    tokens.npy      int32 [N, L] distinct tokenised captions (the pipeline's
                    tokenizer and context length L: exactly the rows batch['text'] holds)
    probs.npy       float32 [N, L] probs[n, i] = P_ref(tokens[n, i] | tokens[n, <i]);
                    1.0 where nothing is predicted (i = 0, padding)

Every training batch gains 'ref_probs' [B, L] float32: the row of its 'text' row,
found by the caption's tokens (a hash, then an exact comparison). It is a pure
function of the batch's text, so batches stay deterministic and resume exactly (the
map has no state), whichever caption of a multi-caption record the transform picked
(the table holds every caption of every record). A row not in the table is a
DataError naming the fix (rerun the tool on this source with this tokenizer).
Start-up reads only meta.json; the arrays are memory-mapped on first lookup, so
data workers share the pages instead of each holding a copy.
"""
import hashlib
import os

import numpy as np

from vlp_jax import errors
from vlp_jax.data import json_files

FIELD = "ref_probs"
FORMAT = "vlp_jax.ref_probs/1"
ARRAYS = ("keys", "tokens", "probs")


def row_keys(tokens) -> np.ndarray:
  """uint64 [N] keys of int32 token rows [N, L] (first 8 bytes of their blake2b)."""
  rows = np.ascontiguousarray(np.asarray(tokens, dtype="<i4"))
  return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(),
                                  "little") for r in rows], np.uint64)


def check_writable(path: str, overwrite: bool = False) -> None:
  """ConfigError if the table folder `path` exists (unless `overwrite`) or is a file."""
  json_files.refuse_existing((path,), overwrite)
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.ConfigError(f"--out={path} is a file; the table is a folder.")


def save(path: str, tokens, probs, tokenizer: str, context_length: int,
         overwrite: bool = False) -> None:
  """Writes the table folder `path` (distinct `tokens` rows [N, L] and their `probs`
  [N, L]); ConfigError if it exists, unless `overwrite`."""
  tokens = np.asarray(tokens, np.int32)
  probs = np.asarray(probs, np.float32)
  if tokens.shape != probs.shape or tokens.ndim != 2:
    raise ValueError(f"tokens {tokens.shape} and probs {probs.shape} must both be "
                     "[N, L].")
  check_writable(path, overwrite)
  keys = row_keys(tokens)
  order = np.argsort(keys, kind="stable")
  arrays = {"keys": keys[order], "tokens": tokens[order], "probs": probs[order]}
  os.makedirs(path, exist_ok=True)
  for name, array in arrays.items():
    np.save(os.path.join(path, name + ".npy"), array)
  meta = {"format": FORMAT, "tokenizer": tokenizer, "context_length": int(context_length),
          "rows": int(len(keys)),
          "sha256": {k: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                     for k, a in arrays.items()}}
  json_files.write_atomic(os.path.join(path, "meta.json"), meta, indent=1)


class Table:
  """A table: `check` reads its metadata; `lookup(text [B, L]) -> float32 [B, L]`
  memory-maps the arrays on first use."""

  def __init__(self, path: str):
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
      raise errors.DataError(
          f"config.data.ref_probs={path!r} is not a reference-probabilities table (no "
          "meta.json); write it with tools/prior_probs.py (README 'PRIOR').")
    meta = json_files.read_format(meta_path, FORMAT, "reference-probabilities table",
                                  "rerun tools/prior_probs.py")
    self.path = path
    self.tokenizer = str(meta["tokenizer"])
    self.context_length = int(meta["context_length"])
    self.rows = int(meta["rows"])
    self._arrays = None

  def check(self, tokenizer: str, context_length: int) -> None:
    """DataError unless the table was made with this tokenizer and context length."""
    if (self.tokenizer, self.context_length) != (tokenizer, int(context_length)):
      raise errors.DataError(
          f"config.data.ref_probs={self.path!r} was made with tokenizer "
          f"{self.tokenizer!r} and context length {self.context_length}, but this run "
          f"uses {tokenizer!r} and {context_length}; rerun tools/prior_probs.py with "
          "this run's config.")

  def arrays(self):
    """(keys [N], tokens [N, L], probs [N, L]), memory-mapped read-only."""
    if self._arrays is None:
      try:
        arrays = tuple(np.load(os.path.join(self.path, n + ".npy"), mmap_mode="r")
                       for n in ARRAYS)
      except (OSError, ValueError) as e:
        raise errors.DataError(f"Cannot read the arrays of config.data.ref_probs="
                               f"{self.path!r} ({e}); rerun tools/prior_probs.py.") from e
      shape = (self.rows, self.context_length)
      if arrays[0].shape != shape[:1] or arrays[1].shape != shape or \
          arrays[2].shape != shape:
        raise errors.DataError(f"The arrays of config.data.ref_probs={self.path!r} do "
                               f"not match its meta.json ({self.rows} rows of "
                               f"{self.context_length}); rerun tools/prior_probs.py.")
      self._arrays = arrays
    return self._arrays

  def lookup(self, text) -> np.ndarray:
    keys_all, tokens, probs = self.arrays()
    text = np.asarray(text, np.int32)
    keys = row_keys(text)
    idx = np.minimum(np.searchsorted(keys_all, keys), len(keys_all) - 1)
    found = (keys_all[idx] == keys) & np.all(tokens[idx] == text, axis=1)
    if not found.all():
      row = int(np.argmin(found))
      raise errors.DataError(
          f"A training caption (tokens {text[row].tolist()}) is not in the reference "
          f"probabilities table config.data.ref_probs={self.path!r}; rerun "
          "tools/prior_probs.py on this run's training source(s) (every caption of "
          "every record is needed).")
    return np.asarray(probs[idx], np.float32)


class Attach:
  """Batch map adding 'ref_probs' [B, L] for the batch's 'text' (the table is loaded
  on first use, in whichever process or worker runs the map)."""

  def __init__(self, path: str):
    self.path = path
    self._table = None

  def __call__(self, batch):
    if self._table is None:
      self._table = Table(self.path)
    return dict(batch, **{FIELD: self._table.lookup(batch["text"])})

  def __getstate__(self):
    return {"path": self.path, "_table": None}
