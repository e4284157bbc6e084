"""DataComp-style filters on embeddings: image-text similarity and near-duplicates.

Both return a keep mask [N] over the candidate rows. Ties are broken by record order
(the earlier record ranks higher), so results are deterministic.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import errors

TOLERANCE = 1e-6  # Of the near-duplicate cosine (float32 rounding of unit vectors).

def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def rank_order(scores: np.ndarray) -> np.ndarray:
  """Indices from the highest score to the lowest, ties by index."""
  return np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))


def similarity_filter(scores: np.ndarray, candidates: np.ndarray,
                      keep_fraction: float = 0.0,
                      min_similarity: Optional[float] = None) -> np.ndarray:
  """Keep mask: among `candidates` (bool [N]), the top `keep_fraction` of all N
  records by score (0 = no fraction rule) and/or those with score >= min_similarity
  (None = no threshold). Both given: both must hold."""
  if not 0.0 <= keep_fraction <= 1.0:
    raise errors.ConfigError(f"keep_fraction must be in [0, 1], got {keep_fraction}.")
  keep = np.asarray(candidates, bool).copy()
  if min_similarity is not None:
    keep &= np.asarray(scores) >= min_similarity
  if keep_fraction:
    budget = int(round(keep_fraction * len(scores)))
    masked = np.where(keep, scores, -np.inf)
    order = rank_order(masked)
    top = np.zeros(len(scores), bool)
    top[order[:budget]] = True
    keep &= top
  return keep


@jax.jit
def _any_above(block, kept, threshold):
  """[b] whether each row of `block` has cosine >= threshold with a row of `kept`."""
  sims = jnp.dot(block, kept.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.any(sims >= threshold, axis=1)


def near_duplicates(emb: np.ndarray, threshold: float, candidates: np.ndarray,
                    priority: Optional[np.ndarray] = None,
                    block: int = 2048) -> np.ndarray:
  """Keep mask removing near-duplicates: cosine similarity >= `threshold` (in (0, 1]).

  The comparison is against `threshold - TOLERANCE`: float32 normalisation leaves
  an exact duplicate's cosine slightly below 1, so threshold 1.0 means "identical".

  Greedy in priority order (highest `priority` first, default record order): a
  candidate is kept unless it is a near-duplicate of one kept before it, so each
  group of near-duplicates keeps its highest-priority member. Blockwise: `block`
  rows at a time against the kept rows in fixed [block, D] tiles on the device (one
  compiled shape), so no N x N matrix is ever formed; O(N x kept) work.
  """
  if not 0.0 < threshold <= 1.0:
    raise errors.ConfigError(f"The near-duplicate threshold is a cosine similarity in "
                             f"(0, 1], got {threshold}.")
  emb = normalize(emb)
  candidates = np.asarray(candidates, bool)
  prio = np.zeros(len(emb)) if priority is None else np.asarray(priority, np.float64)
  order = rank_order(np.where(candidates, prio, -np.inf))
  order = order[candidates[order]]
  keep = np.zeros(len(emb), bool)
  tiles, pending = [], np.zeros((0, emb.shape[1]), np.float32)
  thr = np.float32(threshold - TOLERANCE)
  for start in range(0, len(order), block):
    idx = order[start:start + block]
    rows = emb[idx]
    padded = np.zeros((block, emb.shape[1]), np.float32)
    padded[:len(rows)] = rows
    dup = np.zeros(block, bool)
    for tile in tiles:
      dup |= np.asarray(_any_above(padded, tile, thr))
    dup = dup[:len(rows)]
    if len(pending):
      dup |= (rows @ pending.T >= thr).any(axis=1)
    sims = rows @ rows.T
    for i in range(len(rows)):
      if dup[i]:
        continue
      keep[idx[i]] = True
      dup[i + 1:] |= sims[i, i + 1:] >= thr
    pending = np.concatenate([pending, rows[~dup]])
    while len(pending) >= block:
      tiles.append(jnp.asarray(pending[:block]))
      pending = pending[block:]
  return keep
