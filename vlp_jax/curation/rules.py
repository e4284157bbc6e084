"""The curation rules in their fixed order, on embeddings:

  readable    records that could not be read are dropped first
  similarity  image-text cosine: the top `keep_fraction` of all records and/or those
              >= `min_similarity` (DataComp's CLIP-score filter)
  dedup       near-duplicate images (cosine >= `dedup_threshold`): each group keeps
              its highest-scoring member
  balance     k-means over the image embeddings (`clusters` centroids), then
              `balance_fraction` of all records shared over the clusters by
              `quota` ('equal' or 'proportional'), chosen within each by
              `within_cluster` ('score' or 'strided'; `select.py`) (TL;DR's
              codebook selection, on the model's embeddings)

A rule that is off keeps everything. `apply` returns the keep mask, the rule that
dropped each record ('' when kept) and the counts entering / leaving each rule.
"""
from typing import Dict, List, NamedTuple, Optional

import numpy as np
from absl import logging

from vlp_jax import errors
from vlp_jax.curation import filters, kmeans as kmeans_lib, select


class Options(NamedTuple):
  keep_fraction: float = 0.0
  min_similarity: Optional[float] = None
  dedup_threshold: float = 0.0
  clusters: int = 0
  balance_fraction: float = 0.0
  within_cluster: str = "score"
  kmeans_iters: int = 20
  kmeans_init: str = "random"
  seed: int = 0
  quota: str = "equal"


class Result(NamedTuple):
  keep: np.ndarray          # [N] bool
  dropped_by: np.ndarray    # [N] str: the rule that dropped the record, '' if kept
  counts: List[Dict]        # per rule: {'rule', 'in', 'out', 'dropped', options...}
  clusters: Optional[np.ndarray]  # [N] int cluster of each record (balance rule)


def _fraction(name, value, low_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
  if not ok:
    raise errors.ConfigError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got "
                             f"{value!r}.")


def check(o: Options, records: Optional[int] = None) -> None:
  """ConfigError for inconsistent options (also `clusters` > `records`, the number of
  records to curate, when given): called before any embedding."""
  _fraction("keep_fraction", o.keep_fraction)
  if o.min_similarity is not None and not -1.0 <= o.min_similarity <= 1.0:
    raise errors.ConfigError(f"min_similarity is a cosine similarity in [-1, 1], got "
                             f"{o.min_similarity}.")
  if o.dedup_threshold:
    _fraction("dedup_threshold (a cosine similarity; 0 = off)", o.dedup_threshold, True)
  if o.clusters and o.kmeans_iters < 1:
    raise errors.ConfigError(f"kmeans_iters must be >= 1, got {o.kmeans_iters}.")
  if o.clusters and o.kmeans_init not in kmeans_lib.INITS:
    raise errors.ConfigError(f"Unknown kmeans_init '{o.kmeans_init}'; use one of "
                             f"{kmeans_lib.INITS}.")
  if o.quota not in select.QUOTAS:
    raise errors.ConfigError(f"Unknown quota '{o.quota}'; use one of {select.QUOTAS}.")
  if records is not None and o.clusters > records:
    raise errors.ConfigError(f"clusters={o.clusters} exceeds the {records} records to "
                             "curate; lower --clusters.")
  if o.clusters < 0 or (o.clusters > 0) != (o.balance_fraction > 0):
    raise errors.ConfigError(
        "The balance rule needs both clusters (> 0) and balance_fraction (in (0, 1]); "
        f"got clusters={o.clusters}, balance_fraction={o.balance_fraction}.")
  if not 0.0 <= o.balance_fraction <= 1.0:
    raise errors.ConfigError(f"balance_fraction must be in [0, 1], got "
                             f"{o.balance_fraction}.")
  if o.within_cluster not in select.RULES:
    raise errors.ConfigError(f"Unknown within_cluster '{o.within_cluster}'; use one of "
                             f"{select.RULES}.")


def apply(image_emb: np.ndarray, scores: np.ndarray, readable: np.ndarray,
          o: Options, devices=None) -> Result:
  """Applies the rules (module docstring) in order."""
  check(o, len(scores))
  n = len(scores)
  keep = np.asarray(readable, bool).copy()
  dropped_by = np.full(n, "", dtype=object)
  dropped_by[~keep] = "readable"
  counts = [dict(rule="readable", **{"in": n, "out": int(keep.sum())})]
  clusters = None

  def record(rule, new_keep, **opts):
    dropped_by[keep & ~new_keep] = rule
    counts.append(dict(rule=rule, **{"in": int(keep.sum()), "out": int(new_keep.sum())},
                       **opts))
    logging.info("Rule %s: %d -> %d records.", rule, keep.sum(), new_keep.sum())
    return new_keep

  if o.keep_fraction or o.min_similarity is not None:
    keep = record("similarity", filters.similarity_filter(
        scores, keep, o.keep_fraction, o.min_similarity),
                  keep_fraction=o.keep_fraction, min_similarity=o.min_similarity)
  if o.dedup_threshold:
    keep = record("dedup", filters.near_duplicates(image_emb, o.dedup_threshold, keep,
                                                   priority=scores),
                  threshold=o.dedup_threshold)
  if o.clusters:
    if keep.sum() < o.clusters:
      raise errors.DataError(f"Only {int(keep.sum())} records are left for "
                             f"{o.clusters} clusters; lower --clusters.")
    emb = filters.normalize(image_emb)
    rows = np.nonzero(keep)[0]
    km = kmeans_lib.kmeans(emb[rows], o.clusters, o.kmeans_iters, o.seed, o.kmeans_init,
                           devices=devices, log_every=5)
    clusters = np.full(n, -1, np.int64)
    clusters[rows] = km.assignments
    total = int(round(o.balance_fraction * n))
    keep = record("balance", select.balanced_select(
        np.where(keep, clusters, 0), scores, keep, total, o.within_cluster, o.quota),
                  clusters=o.clusters, balance_fraction=o.balance_fraction, quota=o.quota,
                  within_cluster=o.within_cluster, kmeans_iters=o.kmeans_iters,
                  kmeans_init=o.kmeans_init)
  return Result(keep, dropped_by, counts, clusters)
