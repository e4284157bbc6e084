"""Whole batches as a random-access (MapDataset) stage: worker- and process-count invariant.

Global batch `b` is built from elements `b*B/k .. (b+1)*B/k - 1` of a random-access
element stream (shuffled, repeated, transformed; bad records appear as markers), where
each element gives k = config.data.captions_per_image consecutive rows (k = 1: one row
per element). Process `p` of `P` builds the contiguous rows `p*B/P .. (p+1)*B/P - 1`
(elements `p*B/(P*k) ..`; k must divide B/P), so the process-major concatenation of
the local batches is the same global batch for any `P`. A bad
element `j` is replaced by a seeded spare (`spare_index`) from the same window of the
stream and listed in the batch's `_skipped` entries. Every batch is a pure function of
its index, so grain's `mp_prefetch` (which hands whole elements of the MapDataset to
its workers round-robin and re-interleaves them in order) returns the same stream for
any `worker_count`.
"""
import grain
import numpy as np

from vlp_jax.data import mixture, robust, views

# Spares tried for one bad element before giving up (then most records are bad).
MAX_SPARES = 16
# What every training batch holds, one row per example (int32 [B] for the last three):
# 'label' 0 = caption data, 1 + class (+ offset) = classification data; 'data_type'
# 0 caption / 1 classification; 'image_id' the hash of the source example's key
# (`transforms.example_id`), shared by the k rows of one example.
BATCH_KEYS = ("image", "text", "label", "data_type", "image_id")
# Plus, when config.data.views / .text_views are set, the views' keys ('views/NAME',
# 'view_boxes/NAME', 'text_views/NAME'; `views.py`), also with the batch axis first.


def spare_index(seed: int, index: int, attempt: int, window: int) -> int:
  """Deterministic replacement for bad element `index` (`attempt` = 1, 2, ...): a
  seeded index in the same `window`-sized block of the stream (usually one epoch)."""
  rng = np.random.default_rng([seed & 0xFFFFFFFF, index, attempt])
  return (index // window) * window + int(rng.integers(window))


class ReplaceBad(grain.MapDataset):
  """Element `j` of `elements`, or, when it is a bad-record marker, its first good
  seeded spare; adds `_skipped` (markers met: (kind, key, error, source)) and `_read`."""

  def __init__(self, elements: grain.MapDataset, window: int, seed: int,
               source_name: str = ""):
    super().__init__(elements)
    self._window = max(1, window)
    self._seed = seed
    self._name = source_name

  def __len__(self):
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    element, skipped, attempt = self._parent[index], [], 0
    while robust.is_bad(element):
      skipped.append(robust.marker_info(element, self._name))
      attempt += 1
      if attempt > MAX_SPARES:
        raise robust.TooManyBadRecords(
            f"Source '{self._name}': element {index} and {MAX_SPARES} seeded spares for "
            f"it are all bad (e.g. {skipped[-1][1]}: {skipped[-1][0]} "
            f"{skipped[-1][2]}). Check that the data is readable.")
      element = self._parent[spare_index(self._seed, index, attempt, self._window)]
    return dict(element, _skipped=skipped, _read=len(skipped) + 1)

  def __str__(self):
    return f"ReplaceBad(window={self._window})"


def collate(elements, rows_per_element: int = 1):
  """Stacks the `BATCH_KEYS` and view keys of one-row elements (concatenates those of
  k-row elements, `rows_per_element` = k > 1); concatenates `_skipped`, sums `_read`."""
  join = np.stack if rows_per_element == 1 else np.concatenate
  keys = BATCH_KEYS + tuple(sorted(k for k in elements[0] if views.is_view_key(k)))
  batch = {k: join([e[k] for e in elements]) for k in keys}
  batch["_skipped"] = [s for e in elements for s in e["_skipped"]]
  batch["_read"] = sum(e["_read"] for e in elements)
  return batch


class ProcessBatches(grain.MapDataset):
  """MapDataset of this process's rows of each global batch of `ReplaceBad` elements:
  {'image': [b, ...], 'text': [b, L], 'label' / 'data_type' / 'image_id': [b],
  '_skipped': [(kind, key, error, source)], '_read': int}; each element gives
  `rows_per_element` consecutive rows."""

  def __init__(self, elements: grain.MapDataset, plan, rows_per_element: int = 1):
    """`plan`: a `vlp_jax.batch_plan.BatchPlan` (global batch, this process's rows)."""
    super().__init__(elements)
    mixture.check_captions_per_image(rows_per_element, plan.per_process,
                                     plan.process_count, plan.global_batch)
    self._rows = rows_per_element
    self._global = plan.global_batch // rows_per_element
    self._local = plan.per_process // rows_per_element
    self._offset = plan.process_offset // rows_per_element

  def __len__(self):
    return len(self._parent) // self._global

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = index * self._global + self._offset
    return collate([self._parent[j] for j in range(start, start + self._local)],
                   self._rows)

  def __str__(self):
    return (f"ProcessBatches(global_batch={self._global * self._rows}, "
            f"local={self._local * self._rows}, rows_per_element={self._rows})")
