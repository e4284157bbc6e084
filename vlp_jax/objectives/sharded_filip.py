"""Batch-sharded FILIP loss: a ring over the shards, exact in value and gradient.

With the batch split over n shards (b = B / n pairs each), shard k keeps its b images
and starts with its own b texts. Each of the n rounds it scores its images against
the text block it holds, both directions at once (`filip.token_similarities` gives
the [b, b] blocks of s^I and s^T), then passes the text tokens and masks to the next
shard with `lax.ppermute`, as `sharded.siglip_loss_chunked` does. Two kinds of
running statistics are kept, with online logsumexp:

- per image row (stays on shard k): logsumexp_j of t s^I_ij, sum_j t s^I_ij (label
  smoothing) and the running max / first argmax (accuracy);
- per text column (travels with its text block): logsumexp_i of t s^T_ij, its sum
  and max / argmax. After n - 1 passes each text block has met every image, so
  whichever shard holds it then has its complete column statistics.

The positives t s^I_ii and t s^T_ii come from the first (own) block. The loss is the
psum over shards of the smoothed CE terms, lse - (1 - ls) l_pos - ls mean(l), over
2B; this is `filip.filip_loss_from_tokens` rearranged, so value and gradient match
the dense form (autodiff runs the ring backwards; the ppermute's transpose returns
text gradients to their shard).

Memory per device: each round is one `jax.checkpoint` block, so the backward pass
saves only its inputs (the b text tokens and masks it received, O(b L d)) and
recomputes the similarities. The largest live array is one similarity chunk of
[b, block, N, L] float32 (`block` text rows at a time inside the round), so
per-device memory is O(b * block * N * L + B * L * d) and never O(B^2 N L): doubling
B at fixed shard count grows it about linearly, not fourfold.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlp_jax.objectives import filip as filip_lib
from vlp_jax.objectives import sharded


def _block_stats(img, txt, mask, s, row0, col0, block, smoothing):
  """Row (image) and column (text) statistics of one [b, b] block of scaled scores.

  `row0` / `col0` are the global indices of the block's first image / text, so the
  argmaxes are global. Returns (rows, cols, diag): rows and cols are tuples
  (lse, sum, max, argmax) of [b] arrays (sum is 0 without `smoothing`); diag is
  (t s^I_ii, t s^T_ii) [b], meaningful only on the own (diagonal) block.
  """
  s_i, s_t = filip_lib.token_similarities(img, txt, mask, block=block)
  li, lt = s * s_i, s * s_t

  def stats(x, axis, offset):
    lse = jax.nn.logsumexp(x, axis=axis)
    total = jnp.sum(x, axis=axis) if smoothing else 0.0 * lse
    return (lse, total, jnp.max(x, axis=axis),
            jnp.argmax(x, axis=axis).astype(jnp.int32) + offset)

  return stats(li, 1, col0), stats(lt, 0, row0), (jnp.diagonal(li), jnp.diagonal(lt))


def _merge(acc, new):
  """Merges (lse, sum, max, argmax) statistics; ties keep the smaller global index."""
  lse, total, mx, arg = acc
  lse_n, total_n, mx_n, arg_n = new
  better = (mx_n > mx) | ((mx_n == mx) & (arg_n < arg))
  return (jnp.logaddexp(lse, lse_n), total + total_n, jnp.maximum(mx, mx_n),
          jnp.where(better, arg_n, arg))


def filip_loss_ring(image_tokens, text_tokens, text_mask, scale, label_smoothing=0.0,
                    block=filip_lib.DEFAULT_BLOCK, axes=None):
  """FILIP loss over a batch split along `axes` (default: `sharded.batch_mesh_axes()`).

  Args:
    image_tokens: [B, N, d] image tokens (L2-normalised per token), batch sharded
      over `axes`.
    text_tokens: [B, L, d] text tokens (L2-normalised per token), sharded likewise.
    text_mask: [B, L] true for real text tokens, sharded likewise.
    scale: scalar multiplicative temperature.
    label_smoothing: smoothing mass spread uniformly over the B candidates.
    block: text rows per similarity chunk inside each round.
    axes: mesh axes of the batch split.

  Returns:
    (loss, i2t_acc, t2i_acc): float32 scalars equal to the dense `filip` objective's
    loss and top-1 accuracies (first argmax on ties, as jnp.argmax).
  """
  axes = sharded.batch_mesh_axes() if axes is None else tuple(axes)
  sharded._check_axes(image_tokens, axes)  # pylint: disable=protected-access
  if text_tokens.shape[0] != image_tokens.shape[0]:
    raise ValueError(f"FILIP pairs image i with text i; got {image_tokens.shape[0]} "
                     f"images and {text_tokens.shape[0]} texts. Pass paired batches.")
  global_b = image_tokens.shape[0]
  n = sharded._axes_size(axes)  # pylint: disable=protected-access
  ls = float(label_smoothing)
  # Shard k receives the texts of shard k + 1 each round.
  perm = [(j, (j - 1) % n) for j in range(n)]
  step = jax.checkpoint(functools.partial(_block_stats, block=int(block),
                                          smoothing=bool(ls)))

  def local(img, txt, mask, s):
    s = jnp.asarray(s).astype(jnp.float32)
    mask = mask.astype(bool)
    b = img.shape[0]
    k = lax.axis_index(axes)
    row0 = k * b
    rows, cols, (pos_i, pos_t) = step(img, txt, mask, s, row0, row0)

    def round_(r, carry):
      txt, mask, rows, cols = carry
      txt, mask, cols = lax.ppermute((txt, mask, cols), axes, perm)
      col0 = ((k + r + 1) % n) * b
      new_rows, new_cols, _ = step(img, txt, mask, s, row0, col0)
      return txt, mask, _merge(rows, new_rows), _merge(cols, new_cols)

    _, _, rows, cols = lax.fori_loop(0, n - 1, round_, (txt, mask, rows, cols))
    # This shard now holds the texts of shard k + n - 1 with complete columns.
    own_col0 = ((k + n - 1) % n) * b
    total = (jnp.sum(rows[0]) + jnp.sum(cols[0])
             - (1.0 - ls) * (jnp.sum(pos_i) + jnp.sum(pos_t))
             - ls * (jnp.sum(rows[1]) + jnp.sum(cols[1])) / global_b)
    hits = jnp.stack([
        jnp.sum((rows[3] == row0 + jnp.arange(b)).astype(jnp.float32)),
        jnp.sum((cols[3] == own_col0 + jnp.arange(b)).astype(jnp.float32))])
    loss = lax.psum(total, axes) / (2.0 * global_b)
    acc = lax.psum(hits, axes) / global_b
    return loss, acc[0], acc[1]

  fn = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                     in_specs=(P(axes), P(axes), P(axes), P()),
                     out_specs=(P(), P(), P()))
  return fn(image_tokens, text_tokens, text_mask, scale)
