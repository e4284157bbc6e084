"""Balanced selection over k-means clusters (TL;DR-style codebook selection).

How many records each cluster gives, `quota`:
  'equal'         `balanced_quotas` fills clusters level by level (each gets
                  min(its size, q), q as large as the budget allows; the remainder
                  goes one each to the largest clusters left), so small clusters are
                  kept whole and large ones are cut down to the common level: the
                  rare kinds of data survive, the over-represented are thinned (our
                  default; not TL;DR's rule)
  'proportional'  `proportional_quotas`: the same fraction of every cluster,
                  round(|c| * total / sum |c|) (largest remainders make the sum
                  exact); with 'strided' below this is TL;DR's "every N-th member"

Within a cluster, `rule`:
  'score'    the members with the highest image-text similarity (default: combines
             the balance with the similarity filter's signal)
  'strided'  evenly spaced members in record order (TL;DR's subsampling within a
             cluster; the similarity then acts only through an earlier filter,
             where TL;DR intersects with its ITM top half afterwards)
"""
import numpy as np

from vlp_jax import errors
from vlp_jax.curation import filters

RULES = ("score", "strided")
QUOTAS = ("equal", "proportional")


def balanced_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
  """[k] quotas <= `sizes` summing to min(total, sizes.sum()), as equal as allowed."""
  sizes = np.asarray(sizes, np.int64)
  total = int(min(total, sizes.sum()))
  lo, hi = 0, int(sizes.max()) if len(sizes) else 0
  while lo < hi:  # Largest level q with sum(min(sizes, q)) <= total.
    mid = (lo + hi + 1) // 2
    if np.minimum(sizes, mid).sum() <= total:
      lo = mid
    else:
      hi = mid - 1
  quotas = np.minimum(sizes, lo)
  left = total - int(quotas.sum())
  room = np.nonzero(sizes > quotas)[0]
  room = room[np.lexsort((room, -sizes[room]))][:left]  # Largest clusters first.
  quotas[room] += 1
  return quotas


def proportional_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
  """[k] quotas ~ sizes * total / sizes.sum() summing to min(total, sizes.sum())
  (floors, then one more to the largest remainders, ties to the earlier cluster)."""
  sizes = np.asarray(sizes, np.int64)
  n = int(sizes.sum())
  total = int(min(total, n))
  if not n:
    return np.zeros_like(sizes)
  exact = sizes * total
  quotas = exact // n
  left = total - int(quotas.sum())
  rest = exact - quotas * n
  order = np.lexsort((np.arange(len(sizes)), -rest))
  quotas[order[:left]] += 1
  return quotas


def balanced_select(assignments: np.ndarray, scores: np.ndarray,
                    candidates: np.ndarray, total: int, rule: str = "score",
                    quota: str = "equal") -> np.ndarray:
  """Keep mask [N]: `total` candidates spread over the clusters by `quota`, chosen
  within each cluster by `rule` (module docstring)."""
  if rule not in RULES:
    raise errors.ConfigError(f"Unknown within-cluster rule '{rule}'; use one of {RULES}.")
  if quota not in QUOTAS:
    raise errors.ConfigError(f"Unknown quota '{quota}'; use one of {QUOTAS}.")
  assignments = np.asarray(assignments)
  candidates = np.asarray(candidates, bool)
  k = int(assignments.max()) + 1 if len(assignments) else 0
  members = [np.nonzero(candidates & (assignments == c))[0] for c in range(k)]
  sizes = np.array([len(m) for m in members], np.int64)
  quotas = (balanced_quotas if quota == "equal" else proportional_quotas)(sizes, total)
  keep = np.zeros(len(assignments), bool)
  for m, q in zip(members, quotas):
    if not q:
      continue
    if rule == "score":
      chosen = m[filters.rank_order(np.asarray(scores)[m])[:q]]
    else:
      chosen = m[(np.arange(q) * len(m)) // q]
    keep[chosen] = True
  return keep
