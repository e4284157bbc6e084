"""K-means (Lloyd's algorithm) in JAX over rows held on the host, on any device count.

The rows stream through the devices in fixed-size chunks (one compiled shape; the
last chunk is zero-padded with weight 0), each chunk sharded over a 1-D mesh of the
devices along its rows; centroids are replicated. A chunk's per-centroid sums and
counts are one matmul of the one-hot assignments with the rows, which XLA reduces
across devices, so millions of rows need only a chunk's worth of device memory.
Distances are squared Euclidean (|x|^2 - 2 x.c + |c|^2) at the highest matmul
precision; a centroid that loses all its rows keeps its place. The result is the
same for any device count up to float summation order.

Init: 'random' (k distinct rows, seeded: faiss's default, as TL;DR's clustering) or
'kmeans++' (D^2 sampling, seeded; one pass over the rows per centroid).
"""
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vlp_jax import errors

INITS = ("random", "kmeans++")
_HIGHEST = jax.lax.Precision.HIGHEST


class KMeans(NamedTuple):
  centroids: np.ndarray    # [k, D] float32
  assignments: np.ndarray  # [N] int32: nearest final centroid of each row
  inertia: np.ndarray      # [iters + 1] sum of squared distances before each update
                           # and (last) to the final centroids


def _sqdist(x, c):
  """[n, k] squared distances of rows x [n, D] to centroids c [k, D]."""
  xx = jnp.sum(x * x, axis=1, keepdims=True)
  cc = jnp.sum(c * c, axis=1)[None, :]
  return xx - 2.0 * jnp.dot(x, c.T, precision=_HIGHEST) + cc


def _chunk_stats(x, w, c):
  """(sums [k, D], counts [k], assignments [n], sq. distance [n]) of one chunk."""
  d2 = _sqdist(x, c)
  a = jnp.argmin(d2, axis=1).astype(jnp.int32)
  onehot = jax.nn.one_hot(a, c.shape[0], dtype=x.dtype) * w[:, None]
  sums = jnp.dot(onehot.T, x, precision=_HIGHEST)
  counts = jnp.sum(onehot, axis=0)
  best = jnp.maximum(jnp.min(d2, axis=1), 0.0) * w
  return sums, counts, a, best


def _dist_to(x, c):
  """[n] squared distances of rows x [n, D] to one centroid c [D]."""
  return jnp.maximum(_sqdist(x, c[None])[:, 0], 0.0)


class _Runner:
  """Chunks the rows and runs the jitted, row-sharded kernels over them."""

  def __init__(self, x: np.ndarray, chunk_rows: int, devices=None):
    devices = list(devices or jax.devices())
    self.mesh = jax.sharding.Mesh(np.array(devices), ("rows",))
    n_dev = len(devices)
    self.chunk = max(n_dev, -(-min(chunk_rows, max(len(x), 1)) // n_dev) * n_dev)
    self.x = x
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("rows"))
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.row_sharding, self.replicated = rows, rep
    self.stats = jax.jit(_chunk_stats, in_shardings=(rows, rows, rep),
                         out_shardings=(rep, rep, rows, rows))
    self.dist_to = jax.jit(_dist_to, in_shardings=(rows, rep), out_shardings=rows)

  def chunks(self):
    """Yields (start, n real rows, x chunk, weight chunk) on the devices."""
    for start in range(0, len(self.x), self.chunk):
      part = self.x[start:start + self.chunk]
      n = len(part)
      w = np.ones(self.chunk, np.float32)
      if n < self.chunk:
        part = np.concatenate([part, np.zeros((self.chunk - n, part.shape[1]), part.dtype)])
        w[n:] = 0.0
      yield (start, n, jax.device_put(part, self.row_sharding),
             jax.device_put(w, self.row_sharding))

  def pass_(self, c: np.ndarray):
    """One pass: (sums, counts, assignments [N], total sq. distance)."""
    c = jax.device_put(np.asarray(c, np.float32), self.replicated)
    sums = counts = None
    assign, total = [], 0.0
    for _, n, xc, wc in self.chunks():
      s, k, a, d = self.stats(xc, wc, c)
      sums = s if sums is None else sums + s
      counts = k if counts is None else counts + k
      assign.append(np.asarray(a)[:n])
      total += float(jnp.sum(d))
    return np.asarray(sums), np.asarray(counts), np.concatenate(assign), total

  def min_dist(self, c: np.ndarray) -> np.ndarray:
    """[N] squared distance of every row to centroid `c` [D]."""
    c = jax.device_put(np.asarray(c, np.float32), self.replicated)
    return np.concatenate([np.asarray(self.dist_to(xc, c))[:n]
                           for _, n, xc, _ in self.chunks()])


def _check(x, k, init):
  if x.ndim != 2 or not len(x):
    raise errors.ConfigError(f"k-means needs a non-empty [N, D] array, got {x.shape}.")
  if not 1 <= k <= len(x):
    raise errors.ConfigError(f"k-means with k={k} needs 1 <= k <= the {len(x)} rows; "
                             "lower the number of clusters.")
  if init not in INITS:
    raise errors.ConfigError(f"Unknown k-means init '{init}'; use one of {INITS}.")


def init_centroids(x: np.ndarray, k: int, seed: int = 0, init: str = "random",
                   chunk_rows: int = 16384, devices=None) -> np.ndarray:
  """[k, D] initial centroids: k distinct seeded rows ('random') or k-means++."""
  x = np.asarray(x, np.float32)
  _check(x, k, init)
  rng = np.random.default_rng(seed)
  if init == "random":
    return x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
  runner = _Runner(x, chunk_rows, devices)
  chosen = [int(rng.integers(len(x)))]
  d2 = runner.min_dist(x[chosen[0]])
  for _ in range(1, k):
    total = float(d2.sum())
    if total <= 0:  # Fewer distinct rows than k: take unused rows in order.
      nxt = next(i for i in range(len(x)) if i not in set(chosen))
    else:
      nxt = int(rng.choice(len(x), p=d2 / total))
    chosen.append(nxt)
    d2 = np.minimum(d2, runner.min_dist(x[nxt]))
  return x[chosen].copy()


def lloyd(x: np.ndarray, centroids: np.ndarray, iters: int = 20,
          chunk_rows: int = 16384, devices: Optional[Sequence] = None,
          log_every: int = 0) -> KMeans:
  """`iters` Lloyd updates from `centroids`, then the rows' final assignments."""
  x = np.asarray(x, np.float32)
  c = np.asarray(centroids, np.float32).copy()
  runner = _Runner(x, chunk_rows, devices)
  inertia = []
  for it in range(iters):
    sums, counts, _, total = runner.pass_(c)
    inertia.append(total)
    filled = counts > 0
    c[filled] = sums[filled] / counts[filled, None]
    if log_every and (it + 1) % log_every == 0:
      logging.info("k-means iteration %d/%d: inertia %.4g, %d empty clusters.",
                   it + 1, iters, total, int((~filled).sum()))
  _, _, assign, total = runner.pass_(c)
  inertia.append(total)
  return KMeans(c, assign.astype(np.int32), np.asarray(inertia))


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, init: str = "random",
           chunk_rows: int = 16384, devices=None, log_every: int = 0) -> KMeans:
  """K-means of the rows of `x` [N, D] (see the module docstring)."""
  c = init_centroids(x, k, seed, init, chunk_rows, devices)
  return lloyd(x, c, iters, chunk_rows, devices, log_every)

