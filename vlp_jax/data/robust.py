"""Bad records never kill a run: mark them at read/transform time, drop and count them.

`SafeSource` wraps a source so a record that cannot be read (missing file, corrupt
image, empty caption, ...) becomes a marker `{'_bad': kind, 'key': ...}` instead of an
exception; transforms pass markers through (`safe_transform`); `DropBad` (an
IterDataset stage, checkpointable) removes them, keeps per-kind counts and example
keys in its iterator state, attaches the running counts to every good element as
`_bad_counts`, and raises `TooManyBadRecords` once bad records exceed
`max_bad_fraction` of those read (after `min_records`, so a few early failures in a
small sample do not stop a run).
"""
import collections
import functools

import grain
import numpy as np

KINDS = ("unreadable", "truncated", "empty", "zero_size", "missing_file", "bad_caption")


class TooManyBadRecords(RuntimeError):
  pass


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
  """Random-access source whose failing records become `{'_bad': kind, 'key': ...}`."""

  def __init__(self, source, name: str):
    self.source, self.name = source, name

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      return self.source[index]
    except IndexError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      return {"_bad": bad_kind(e), "key": f"{self.name}[{index}]", "error": str(e)[:200]}

  def __getattr__(self, name):  # class_names, class_prompts, ...
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


class DropBadIterator(grain.DatasetIterator):
  """Skips bad markers, counting them per kind; state = parent state + counts."""

  def __init__(self, parent, source_name, max_bad_fraction, min_records):
    super().__init__(parent)
    self._source_name = source_name
    self._max_fraction = max_bad_fraction
    self._min_records = min_records
    self._seen = 0
    self._counts = collections.Counter()
    self._examples = collections.defaultdict(list)

  def __next__(self):
    while True:
      element = next(self._parent)
      self._seen += 1
      if not is_bad(element):
        element = dict(element)
        element["_bad_counts"] = np.array([self._counts[k] for k in KINDS], np.int64)
        element["_seen"] = np.int64(self._seen)
        return element
      kind = element["_bad"]
      self._counts[kind] += 1
      if len(self._examples[kind]) < 5:
        self._examples[kind].append(f"{element['key']} ({element.get('error', '')})")
      self._check()

  def _check(self):
    bad = sum(self._counts.values())
    if self._seen >= self._min_records and bad > self._max_fraction * self._seen:
      detail = "; ".join(f"{k}: {n} (e.g. {', '.join(self._examples[k][:3])})"
                         for k, n in self._counts.most_common())
      raise TooManyBadRecords(
          f"Source '{self._source_name}': {bad} of {self._seen} records are bad "
          f"({bad / self._seen:.1%} > config.data.max_bad_fraction="
          f"{self._max_fraction}). By kind: {detail}. Fix or filter the data, or raise "
          "config.data.max_bad_fraction.")

  def get_state(self):
    return {"parent": self._parent.get_state(), "seen": self._seen,
            "counts": dict(self._counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._seen = state["seen"]
    self._counts = collections.Counter(state["counts"])


class DropBad(grain.IterDataset):
  """IterDataset stage that removes and counts bad-record markers."""

  def __init__(self, parent, source_name: str, max_bad_fraction: float,
               min_records: int = 100):
    super().__init__(parent)
    self._args = (source_name, max_bad_fraction, min_records)

  def __iter__(self):
    return DropBadIterator(self._parent.__iter__(), *self._args)


def summarize(batch):
  """(per-kind counts dict, records seen) from a batch's `_bad_counts`/`_seen` rows."""
  counts = np.max(np.asarray(batch["_bad_counts"]), axis=0)
  return dict(zip(KINDS, counts.tolist())), int(np.max(batch["_seen"]))
