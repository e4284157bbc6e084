"""Whole batches as a random-access (MapDataset) stage: worker- and process-count invariant.

Global batch `b` is built from elements `b*B .. b*B+B-1` of a random-access element
stream (shuffled, repeated, transformed; bad records appear as markers). Process `p`
of `P` builds the contiguous rows `p*B/P .. (p+1)*B/P - 1`, so the process-major
concatenation of the local batches is the same global batch for any `P`. A bad
element `j` is replaced by a seeded spare (`spare_index`) from the same window of the
stream and listed in the batch's `_skipped` entries. Every batch is a pure function of
its index, so grain's `mp_prefetch` (which hands whole elements of the MapDataset to
its workers round-robin and re-interleaves them in order) returns the same stream for
any `worker_count`.
"""
import sys

import grain
import numpy as np

from vlp_jax.data import robust

# Spares tried for one bad element before giving up (then most records are bad).
MAX_SPARES = 16


def spare_index(seed: int, index: int, attempt: int, window: int) -> int:
  """Deterministic replacement for bad element `index` (`attempt` = 1, 2, ...): a
  seeded index in the same `window`-sized block of the stream (usually one epoch)."""
  rng = np.random.default_rng([seed & 0xFFFFFFFF, index, attempt])
  return (index // window) * window + int(rng.integers(window))


class RobustBatches(grain.MapDataset):
  """MapDataset of this process's batches; each is
  {'image': [b, ...], 'text': [b, L], '_skipped': [(kind, key, error)], '_read': int}."""

  def __init__(self, elements: grain.MapDataset, global_batch: int, window: int,
               seed: int, process_index: int = 0, process_count: int = 1,
               source_name: str = ""):
    super().__init__(elements)
    if global_batch % process_count:
      raise ValueError(f"batch_size {global_batch} is not divisible by the number of "
                       f"processes ({process_count}).")
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._window = max(1, window)
    self._seed = seed
    self._name = source_name

  def __len__(self):
    return sys.maxsize // self._global

  def _good(self, j, skipped):
    element = self._parent[j]
    attempt = 0
    while robust.is_bad(element):
      skipped.append(robust.marker_info(element))
      attempt += 1
      if attempt > MAX_SPARES:
        raise robust.TooManyBadRecords(
            f"Source '{self._name}': element {j} and {MAX_SPARES} seeded spares for it "
            f"are all bad (e.g. {skipped[-1][1]}: {skipped[-1][0]} {skipped[-1][2]}). "
            "Check that the data is readable.")
      element = self._parent[spare_index(self._seed, j, attempt, self._window)]
    return element

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._global + self._offset
    skipped = []
    rows = [self._good(j, skipped) for j in range(start, start + self._local)]
    batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "text")}
    batch["_skipped"] = skipped
    batch["_read"] = self._local + len(skipped)
    return batch

  def __str__(self):
    return f"RobustBatches(global_batch={self._global}, local={self._local})"
