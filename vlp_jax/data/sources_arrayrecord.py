"""ArrayRecord shards of image-text examples: 'arrayrecord:/data/train-*.arrayrecord'.

Record format (one serialized dict per record, written by `encode_record`):

  {'image': encoded image bytes (JPEG/PNG/...), 'text': str | [str], ...other fields}

serialized with msgpack (binary image bytes as-is) when it is importable, else as
JSON with the image base64-encoded; `decode_record` reads both (JSON records start
with '{'). Extra fields (e.g. 'label', 'key') are passed through to examples.

The glob is expanded and sorted; a literal '{split}' in it is replaced by the split.
"""
import base64
import glob
import json
import os
from typing import Any, Dict, Iterable, List, Sequence, Union

import numpy as np

from vlp_jax import errors
from vlp_jax.data import sources_files
from vlp_jax.registry import SOURCES

try:
  import msgpack  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  msgpack = None

# Readers pick records at random: a group size of 1 makes that one seek per record.
WRITER_OPTIONS = "group_size:1"


def _plain(value):
  """numpy scalars / arrays / tuples -> python values msgpack and json can store."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def encode_record(image_bytes: bytes, text: Union[str, Sequence[str]], **fields) -> bytes:
  """Serializes one example: encoded image bytes, caption(s) and extra fields."""
  if not isinstance(image_bytes, (bytes, bytearray)):
    raise TypeError(f"image_bytes must be encoded image bytes, got {type(image_bytes)}.")
  rec = {"image": bytes(image_bytes), "text": _plain(text)}
  rec.update({k: _plain(v) for k, v in fields.items()})
  if msgpack is not None:
    return msgpack.packb(rec, use_bin_type=True)
  rec["image"] = base64.b64encode(rec["image"]).decode("ascii")
  return json.dumps(rec).encode("utf-8")


def decode_record(data: bytes) -> Dict[str, Any]:
  """Inverse of `encode_record` (either serialization); 'image' stays encoded bytes."""
  if data[:1] == b"{":
    rec = json.loads(data)
    rec["image"] = base64.b64decode(rec["image"])
    return rec
  if msgpack is None:  # pragma: no cover
    raise ImportError("This record is msgpack-encoded; `pip install msgpack`.")
  return msgpack.unpackb(data, raw=False)


def shard_paths(pattern: str, num_shards: int) -> List[str]:
  """'/d/train.arrayrecord' -> ['/d/train.arrayrecord-00000-of-00002', ...].

  A pattern holding '{shard}' (and optionally '{num_shards}') is formatted instead,
  e.g. '/d/train-{shard:05d}-of-{num_shards:05d}.arrayrecord'.
  """
  if "{shard" in pattern:
    return [pattern.format(shard=i, num_shards=num_shards) for i in range(num_shards)]
  return [f"{pattern}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def write_shards(records: Iterable[bytes], pattern: str, num_shards: int = 1) -> List[str]:
  """Writes serialized records round-robin into `num_shards` files; returns their paths.

  Record j goes to shard j % num_shards, so `records` may be a stream of any length.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
  paths = shard_paths(pattern, num_shards)
  for p in paths:
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  writers = [array_record_module.ArrayRecordWriter(p, WRITER_OPTIONS) for p in paths]
  try:
    for j, rec in enumerate(records):
      writers[j % num_shards].write(rec)
  finally:
    for w in writers:
      w.close()
  return paths


class ArrayRecordSource:
  """Random access over sorted ArrayRecord shards of `encode_record` examples."""

  def __init__(self, pattern: str, size: int = 0):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    if not pattern:
      raise errors.ConfigError("The arrayrecord source needs a glob: "
                       "'arrayrecord:/data/train-*.arrayrecord'.")
    self.paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not self.paths:
      folder = os.path.dirname(pattern) or "."
      hint = ("" if any(c in folder for c in "*?[") or os.path.isdir(folder)
              else f" (folder '{folder}' does not exist)")
      raise errors.DataPathError(
          f"No ArrayRecord files match '{pattern}'{hint}. Pass a glob of existing shards, "
          "e.g. --config.data.source='arrayrecord:/data/train-*.arrayrecord'.")
    self.pattern = pattern
    self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
    total = len(self._source)
    if not total:
      raise errors.DataError(
          f"The ArrayRecord files matching '{pattern}' hold no records.")
    self.size = min(size, total) if size else total
    try:
      first = decode_record(self._source[0])
    except Exception as e:  # pylint: disable=broad-except
      raise errors.DataError(f"Cannot decode the first record of '{self.paths[0]}' ({e!r}); "
                       "records must be written with "
                       "vlp_jax.data.sources_arrayrecord.encode_record.") from e
    missing = [k for k in ("image", "text") if k not in first]
    if missing:
      raise errors.DataError(f"Records in '{self.paths[0]}' have no {missing} field (fields: "
                       f"{sorted(first)}); write them with encode_record(image_bytes, "
                       "text, **fields).")

  def __len__(self):
    return self.size

  def __getitem__(self, i) -> Dict[str, Any]:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(f"index {i} out of range for {self.size} records.")
    rec = decode_record(self._source[i])  # 'image' stays encoded: the transform decodes.
    rec.setdefault("key", f"{self.pattern}[{i}]")
    return rec


@SOURCES.register("arrayrecord")
def make_arrayrecord_source(path, split="train", size=0, **unused):
  return ArrayRecordSource(sources_files.resolve_split(path, split), size)
