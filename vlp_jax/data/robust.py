"""Bad records never kill a run: mark them at read/transform time, drop and count them.

`SafeSource` wraps a source so a record that cannot be read (missing file, corrupt
image, empty caption, ...) becomes a marker `{'_bad': kind, 'key': ...}` instead of an
exception; transforms pass markers through (`safe_transform`). Batches are built
from good elements only (`batches.py` replaces a marker by a seeded spare record;
`DropBad` skips markers of iterable sources) and list the markers they met as
`_skipped` and the records read as `_read`. `BadRecordMonitor` (an IterDataset stage,
checkpointable) turns those into running per-kind counts `_bad_counts` / `_seen` on
every batch and raises `TooManyBadRecords` once bad records exceed
`max_bad_fraction` of those read (after `min_records`, so a few early failures in a
small sample do not stop a run).
"""
import collections
import functools

import grain
import numpy as np

from vlp_jax import errors

KINDS = ("unreadable", "truncated", "empty", "zero_size", "missing_file", "bad_caption")


class TooManyBadRecords(errors.DataError, RuntimeError):
  """More bad records than config.data.max_bad_fraction allows (a UserError)."""


def bad_kind(error: Exception) -> str:
  kind = getattr(error, "kind", None)
  if kind in KINDS:
    return kind
  if isinstance(error, FileNotFoundError):
    return "missing_file"
  return "unreadable"


def is_bad(element) -> bool:
  return isinstance(element, dict) and "_bad" in element


class SafeSource:
  """Random-access source whose failing records become `{'_bad': kind, 'key': ...}`;
  a record without a 'key' gets 'NAME[index]' (training batches hash it to 'image_id')."""

  def __init__(self, source, name: str):
    self.source, self.name = source, name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      element = self.source[index]
    except IndexError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      return {"_bad": bad_kind(e), "key": f"{self.name}[{index}]", "error": str(e)[:200],
              "source": self.name}
    if isinstance(element, dict) and "key" not in element:
      element = dict(element, key=f"{self.name}[{index}]")
    return element

  def __getattr__(self, name):  # class_names, root, ...
    if name.startswith("__") or name == "source":  # Unpickling in worker processes.
      raise AttributeError(name)
    return getattr(self.source, name)


def _safe_call(fn, element, *args):
  if is_bad(element):
    return element
  try:
    return fn(element, *args)
  except Exception as e:  # pylint: disable=broad-except
    return {"_bad": bad_kind(e), "key": str(element.get("key", "?")), "error": str(e)[:200]}


def safe_transform(transform):
  """Wraps a grain RandomMap/Map so markers pass through and failures become markers."""
  if isinstance(transform, grain.transforms.RandomMap):
    return functools.partial(_safe_call, transform.random_map)
  return functools.partial(_safe_call, transform.map)


def marker_info(element, source: str = ""):
  """(kind, key, error, source) of a bad-record marker (`source` if it names none)."""
  return (element["_bad"], str(element.get("key", "?")), element.get("error", ""),
          element.get("source", source))


def tag_source(source: str, element):
  """Marks a bad-record marker with the spec of the source it came from."""
  return dict(element, source=source) if is_bad(element) else element


class DropBadIterator(grain.DatasetIterator):
  """Element stream -> good elements only; each carries the markers skipped before it
  as `_skipped` (list of (kind, key, error, source)) and `_read` (records read)."""

  def __next__(self):
    bad = []
    while True:
      element = next(self._parent)
      if not is_bad(element):
        element = dict(element)
        element["_skipped"], element["_read"] = bad, len(bad) + 1
        return element
      bad.append(marker_info(element))

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class DropBad(grain.IterDataset):
  """IterDataset stage that removes bad-record markers (for iterable sources)."""

  def __iter__(self):
    return DropBadIterator(self._parent.__iter__())


class BadRecordMonitorIterator(grain.DatasetIterator):
  """Accumulates the per-batch `_skipped` / `_read` entries into running counts per kind
  (in the batch) and per source (in the error message);
  state = parent state + counts, so a resumed run keeps counting where it stopped."""

  def __init__(self, parent, source_name, max_bad_fraction, min_records):
    super().__init__(parent)
    self._source_name = source_name
    self._max_fraction = max_bad_fraction
    self._min_records = min_records
    self._seen = 0
    self._counts = collections.Counter()
    self._by_source = collections.Counter()
    self._examples = collections.defaultdict(list)

  def __next__(self):
    batch = dict(next(self._parent))
    self._seen += int(batch.pop("_read"))
    for kind, key, error, source in batch.pop("_skipped"):
      self._counts[kind] += 1
      self._by_source[source] += 1
      if len(self._examples[kind]) < 5:
        self._examples[kind].append(f"{key} ({error})" if error else key)
    self._check()
    # One row per example (like every other batch field, so the batch still shards).
    rows = len(batch["text"])
    counts = np.array([self._counts[k] for k in KINDS], np.int64)
    batch["_bad_counts"] = np.broadcast_to(counts, (rows, len(KINDS))).copy()
    batch["_seen"] = np.full((rows,), self._seen, np.int64)
    return batch

  def _check(self):
    bad = sum(self._counts.values())
    if self._seen >= self._min_records and bad > self._max_fraction * self._seen:
      detail = "; ".join(f"{k}: {n} (e.g. {', '.join(self._examples[k][:3])})"
                         for k, n in self._counts.most_common())
      raise TooManyBadRecords(
          f"Source '{self._source_name}': {bad} of {self._seen} records are bad "
          f"({bad / self._seen:.1%} > config.data.max_bad_fraction="
          f"{self._max_fraction}). By kind: {detail}. By source: "
          f"{dict(self._by_source.most_common())}. Fix or filter the data, or raise "
          "config.data.max_bad_fraction.")

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self._seen,
            "counts": dict(self._counts), "by_source": dict(self._by_source)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._seen = state["seen"]
    self._counts = collections.Counter(state["counts"])
    self._by_source = collections.Counter(state.get("by_source", {}))


class BadRecordMonitor(grain.IterDataset):
  """Batches with `_skipped`/`_read` -> batches with running `_bad_counts` [B, K] /
  `_seen` [B] (the same in every row);
  raises `TooManyBadRecords` past `max_bad_fraction` (after `min_records`). Runs in
  the main process, after any worker processes."""

  def __init__(self, parent, source_name: str, max_bad_fraction: float,
               min_records: int = 100):
    super().__init__(parent)
    self._args = (source_name, max_bad_fraction, min_records)

  def __iter__(self):
    return BadRecordMonitorIterator(self._parent.__iter__(), *self._args)


def summarize(batch):
  """(per-kind counts dict, records seen) from a batch's `_bad_counts` / `_seen` rows."""
  counts = np.asarray(batch["_bad_counts"]).reshape(-1, len(KINDS)).max(axis=0)
  return dict(zip(KINDS, counts.tolist())), int(np.max(batch["_seen"]))
