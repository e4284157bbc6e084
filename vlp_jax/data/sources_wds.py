"""WebDataset tar shards, streamed: 'wds:/data/shard-{00000..00099}.tar'.

A pattern is a comma list of parts; each part is brace-expanded (`{000..099}` ranges
keep the zero padding, `{a,b}` alternatives) and globbed; a shard named explicitly
(not by a glob) that does not exist is an error. Members of a tar are grouped
by key (the member name up to the first '.' of its basename): `KEY.jpg|jpeg|png|webp`
is the image, `KEY.txt` the caption, or `KEY.json` with a `caption` / `captions` /
`text` field. Shards are read with `tarfile` in stream mode (no index).

`WdsDataset` is a grain IterDataset. In epoch `e` the shards are permuted with a seed
from (seed, e); process `p` of `P` reads shards `p::P` of that order and grain worker
`w` of `W` reads `w::W` of those (`set_slice`, called by `mp_prefetch`). An optional
block shuffle permutes each block of `shuffle_buffer` consecutive samples with a seeded
RNG. The iterator state is (epoch, shard position, sample offset in the shard) of the
current block plus the position within it, so restoring re-reads one block at most.
"""
import glob
import io
import json
import os
import re
import tarfile
from typing import Any, Dict, Iterator, List, Tuple

import grain
import numpy as np

from vlp_jax import errors
from vlp_jax.data import decode
from vlp_jax.registry import SOURCES

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _split_top_level(pattern: str) -> List[str]:
  """Splits at commas outside braces."""
  parts, depth, current = [], 0, ""
  for ch in pattern:
    depth += (ch == "{") - (ch == "}")
    if ch == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += ch
  parts.append(current)
  return [p.strip() for p in parts if p.strip()]


def expand_braces(pattern: str) -> List[str]:
  """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', 'a01bx', ...] (bash-style, in order)."""
  m = re.search(r"\{([^{}]*)\}", pattern)
  if not m:
    return [pattern]
  head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
  rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
  if rng:
    lo, hi = rng.group(1), rng.group(2)
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    step = 1 if int(hi) >= int(lo) else -1
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  elif "," in body:
    options = body.split(",")
  else:  # A literal brace pair (e.g. a '{split}' left in a path).
    return [head + "{" + body + "}" + t for t in expand_braces(tail)]
  return [head + o + t for o in options for t in expand_braces(tail)]


def expand_pattern(pattern: str) -> List[str]:
  """Tar paths named by a comma list of brace patterns / globs, in the given order.

  Every path named explicitly (by a brace expansion or a list item without glob
  characters) must be an existing file: missing ones raise DataPathError, counted and
  listed. A glob matches the files that exist (and must match some).
  """
  paths, missing, named = [], [], 0
  for part in _split_top_level(pattern):
    for path in expand_braces(os.path.expanduser(part)):
      if any(c in path for c in "*?["):
        paths.extend(sorted(glob.glob(path)))
        continue
      named += 1
      (paths if os.path.isfile(path) else missing).append(path)
  if missing:
    shown = ", ".join(f"'{p}'" for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    folder = os.path.dirname(missing[0]) or "."
    hint = "" if os.path.isdir(folder) else f" (folder '{folder}' does not exist)"
    raise errors.DataPathError(
        f"{len(missing)} of the {named} webdataset shards named by '{pattern}' are "
        f"missing: {shown}{more}{hint}. Name only existing shards (e.g. a shorter "
        "range), or use a glob such as 'wds:/data/shard-*.tar' to read the shards "
        "that exist.")
  if not paths:
    raise errors.DataPathError(
        f"No webdataset tar shards match '{pattern}'. Pass existing files as a brace "
        "pattern, glob or comma list, e.g. "
        "--config.data.source='wds:/data/shard-{00000..00099}.tar'.")
  return paths


def check_readable(path: str) -> None:
  """Raises DataError naming `path` when it is not a readable tar file."""
  try:
    with tarfile.open(path, mode="r|*") as tar:
      tar.next()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise errors.DataError(
        f"Webdataset shard '{path}' is not a readable tar file ({e}).") from e


def _split_name(name: str) -> Tuple[str, str]:
  folder, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(folder, stem), ext.lower()


def iter_samples(path: str, skip: int = 0,
                 _errors=(tarfile.TarError, OSError, EOFError)
                 ) -> Iterator[Tuple[str, Dict[str, bytes]]]:
  """(key, {ext: bytes}) per sample of a tar, streamed; the first `skip` samples are
  passed over without reading their data. A damaged tar ends with a
  ('', {'_error': message}) item."""
  index, key, files = 0, None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _split_name(member.name)
        if os.path.basename(k).startswith(".") or not ext:
          continue
        if k != key:
          if key is not None:
            if index >= skip:
              yield key, files
            index += 1
          key, files = k, {}
        if index >= skip:
          files[ext] = tar.extractfile(member).read()
      if key is not None and index >= skip:
        yield key, files
  except _errors as e:  # (bound early: generators may close at interpreter exit)
    if index >= skip:  # The error takes the place of sample `index`.
      yield "", {"_error": f"{path}: {e}"}


def to_element(path: str, key: str, files: Dict[str, bytes]) -> Dict[str, Any]:
  """One sample -> {'image': encoded bytes, 'text': str | [str], 'key'} or a bad marker."""
  name = f"{path}:{key}"
  if "_error" in files:
    return {"_bad": "unreadable", "key": path, "error": files["_error"][:200]}
  image = next((files[e] for e in IMAGE_EXTS if e in files), None)
  if image is None:
    return {"_bad": "missing_file", "key": name,
            "error": f"no image member ({'/'.join(IMAGE_EXTS)}); has {sorted(files)}"}
  text = None
  if "txt" in files:
    text = files["txt"].decode("utf-8", errors="replace")
  elif "json" in files:
    try:
      meta = json.loads(files["json"])
    except ValueError as e:
      return {"_bad": "bad_caption", "key": name, "error": f"bad json: {e}"}
    text = next((meta[f] for f in ("caption", "captions", "text")
                 if isinstance(meta, dict) and f in meta), None)
  if text is None:
    return {"_bad": "bad_caption", "key": name, "error": "no .txt or .json caption"}
  return {"image": image, "text": text, "key": name}


class WdsIterator(grain.DatasetIterator):
  """Streams this process's / worker's shards epoch after epoch; checkpointable."""

  def __init__(self, ds: "WdsDataset"):
    super().__init__()
    self._ds = ds
    self._start = (0, 0, 0)  # (epoch, shard position, offset) where the block starts
    self._in_block = 0
    self._block = None
    self._reader = None

  def _samples(self, epoch, shard, offset):
    """Yields (element, position after it), from a position onwards, forever."""
    empty_epochs = 0
    while True:
      shards = self._ds.shards_for_epoch(epoch)
      read = 0
      while shard < len(shards):
        path = shards[shard]
        for key, files in iter_samples(path, offset):
          offset, read = offset + 1, read + 1
          yield to_element(path, key, files), (epoch, shard, offset)
        shard, offset = shard + 1, 0
      empty_epochs = 0 if read else empty_epochs + 1
      if empty_epochs > 1:
        raise errors.DataError(f"The webdataset shards {shards} hold no samples.")
      epoch, shard = epoch + 1, 0

  def _fill_block(self):
    if self._reader is None:  # After set_state: re-read from the block's start.
      self._reader = self._samples(*self._start)
    size = max(1, self._ds.shuffle_buffer)
    block = [next(self._reader) for _ in range(size)]
    self._end = block[-1][1]
    elements = [b[0] for b in block]
    if size > 1:
      seed = [self._ds.seed & 0xFFFFFFFF, *self._start, self._ds.slot]
      order = np.random.default_rng(seed).permutation(size)
      elements = [elements[i] for i in order]
    self._block = elements

  def __next__(self):
    if self._block is None:
      self._fill_block()
    element = self._block[self._in_block]
    self._in_block += 1
    if self._in_block == len(self._block):
      self._start, self._in_block, self._block = self._end, 0, None
    return element

  def get_state(self):
    epoch, shard, offset = self._start
    return {"epoch": epoch, "shard": shard, "offset": offset,
            "in_block": self._in_block}

  def set_state(self, state):
    self._start = (state["epoch"], state["shard"], state["offset"])
    self._in_block = state["in_block"]
    self._block = self._reader = None


class WdsDataset(grain.IterDataset):
  """Iterable webdataset source (see the module docstring for the shard split)."""

  def __init__(self, paths: List[str], seed: int = 0, shuffle_buffer: int = 0,
               process_index: int = 0, process_count: int = 1):
    super().__init__()
    self.paths = list(paths)
    self.seed = seed
    self.shuffle_buffer = shuffle_buffer
    self._process = (process_index, process_count)
    self._worker = (0, 1)

  @property
  def slot(self) -> int:
    return self._process[0] * self._worker[1] + self._worker[0]

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Called by grain's `mp_prefetch` in worker `sl.start` of `sl.step`."""
    del sequential_slice
    self._worker = (sl.start or 0, sl.step or 1)

  def shards_for_epoch(self, epoch: int) -> List[str]:
    order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(
        len(self.paths))
    (p, num_p), (w, num_w) = self._process, self._worker
    mine = [self.paths[i] for i in order][p::num_p][w::num_w]
    if not mine:
      raise errors.DataError(
          f"{len(self.paths)} webdataset shard(s) cannot feed {num_p} process(es) x "
          f"{num_w} worker(s): every reader needs at least one shard. Split the data "
          "into more shards or lower config.data.worker_count.")
    return mine

  def __iter__(self):
    return WdsIterator(self)

  def __str__(self):
    return f"WdsDataset({len(self.paths)} shards)"


def open_wds(pattern: str, seed: int, shuffle_buffer: int, process_index: int,
             process_count: int) -> WdsDataset:
  """Expands and checks the shards (errors name the pattern / the bad file)."""
  if not pattern:
    raise errors.ConfigError(
        "The wds source needs a pattern: 'wds:/data/shard-{0000..0099}.tar'.")
  paths = expand_pattern(pattern)
  for path in paths:
    check_readable(path)
  return WdsDataset(paths, seed, shuffle_buffer, process_index, process_count)


class WdsListSource:
  """Random access over all samples of the shards (reads them all once): for
  evaluation and tools, where the data is small or read in full anyway."""

  def __init__(self, pattern: str, size: int = 0):
    self.paths = expand_pattern(pattern)
    self.samples = []
    for path in self.paths:
      check_readable(path)
      for key, files in iter_samples(path):
        self.samples.append(to_element(path, key, files))
        if size and len(self.samples) >= size:
          return

  def __len__(self):
    return len(self.samples)

  def __getitem__(self, i):
    element = self.samples[i]
    if "_bad" in element:
      raise decode.BadRecord(element["_bad"], f"{element['key']}: {element['error']}")
    return dict(element)  # 'image' stays encoded: the transform decodes it.


@SOURCES.register("wds")
def make_wds_source(path, size=0, **unused):
  """Random-access view (evaluation, tools); training streams with `open_wds`."""
  return WdsListSource(path, size)


def write_shard(path: str, samples) -> str:
  """Writes (key, {ext: bytes or str}) samples as a webdataset tar (tests, tools)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for key, files in samples:
      for ext, data in files.items():
        data = data.encode("utf-8") if isinstance(data, str) else data
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return path
