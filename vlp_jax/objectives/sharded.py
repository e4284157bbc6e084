"""Batch-sharded contrastive losses with exact gradients and bounded logits memory.

With the batch split over `n` devices (b = B / n rows each), the dense losses build
the full [B, B] logits. These forms never do:

- `clip_loss_local`: open_clip's local loss (`--local-loss --gather-with-grad`). Each
  shard all-gathers the other modality (differentiably) and computes its own b x B
  rows of both directions: O(b * B) logits per device. Soft targets that are
  `a * onehot + c` per row (label smoothing, smoothing over the negatives only) need
  only the row's logit at its label and the row's logit sum (`target_coefficients`).
- `siglip_loss_chunked`: the SigLIP ring. Each shard computes its b x b positive block,
  then passes text embeddings around the ring (`ppermute`) for n - 1 negatives-only
  blocks. Each block is rematerialised in the backward pass: O(b^2) logits per device.

Both equal the dense losses in `contrastive.py` in value and gradient. They run as
`jax.shard_map` over the active (abstract) mesh, so call them under `jax.set_mesh`.
"""
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlp_jax import sharding


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def batch_mesh_axes(rules=None):
  """Mesh axes the logical 'batch' axis is split over in the active mesh.

  `rules` default to the active `nn.logical_axis_rules` (as the train loop sets from
  `config.sharding_rules`), else `sharding.DEFAULT_RULES`. Returns the axes (in rule
  order) that exist in `jax.sharding.get_abstract_mesh()`, are not already manual and
  have size > 1; () without a mesh or when the batch is not split.
  """
  rules = rules or nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  entry = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if entry is None:
    return ()
  entry = (entry,) if isinstance(entry, str) else tuple(entry)
  manual = set(mesh.manual_axes)
  return tuple(a for a in entry
               if a in mesh.shape and a not in manual and mesh.shape[a] > 1)


def _axes_size(axes):
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def can_shard_batch(batch_size, axes):
  """True when `axes` is non-empty and divides a global batch of `batch_size`."""
  return bool(axes) and batch_size % _axes_size(axes) == 0


def _check_axes(image_emb, axes):
  if not axes:
    raise ValueError("Distributed contrastive losses need batch mesh axes; got none. "
                     "Call them under `jax.set_mesh(mesh)` with the batch split, or "
                     "use the dense losses in vlp_jax.objectives.contrastive.")
  n = _axes_size(axes)
  if image_emb.shape[0] % n:
    raise ValueError(f"Global batch {image_emb.shape[0]} is not divisible by the "
                     f"{n} shards of mesh axes {axes}; use a multiple of {n}.")


@jax.custom_vjp
def _lse_argmax(rows, cols):
  """Row-wise logsumexp and argmax of the logits `rows @ cols.T` [b, C].

  The backward pass recomputes the logits rather than saving them, so no [b, C]
  array outlives either pass.
  """
  logits = rows @ cols.T
  return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)


def _lse_argmax_fwd(rows, cols):
  lse, idx = _lse_argmax(rows, cols)
  return (lse, idx), (rows, cols, lse)


def _lse_argmax_bwd(res, g):
  rows, cols, lse = res
  probs = jnp.exp(rows @ cols.T - lse[:, None]) * g[0][:, None]
  return probs @ cols, probs.T @ rows


_lse_argmax.defvjp(_lse_argmax_fwd, _lse_argmax_bwd)


def is_static_zero(x):
  """True for a Python number equal to 0 (not for arrays or traced values)."""
  return isinstance(x, (int, float)) and x == 0


def target_coefficients(n, label_smoothing=0.0, negative_smoothing=0.0):
  """(a, c) with soft targets `a * onehot + c` over `n` candidates (they sum to 1).

  `label_smoothing` ls: the label gets 1 - ls + ls / n, every candidate ls / n
  (a = 1 - ls, c = ls / n). `negative_smoothing` alpha: the label gets 1 - alpha and
  each of the n - 1 negatives alpha / (n - 1) (c = alpha / (n - 1), a = 1 - alpha - c;
  with n = 1 there are no negatives and the target stays one-hot). Either may be a
  traced scalar (a schedule); at most one of them is non-zero.
  """
  if not is_static_zero(label_smoothing) and not is_static_zero(negative_smoothing):
    raise ValueError("label_smoothing and negative_smoothing are both set; use one.")
  if not is_static_zero(negative_smoothing):
    c = negative_smoothing / (n - 1) if n > 1 else 0.0 * negative_smoothing
    return 1.0 - negative_smoothing - c, c
  return 1.0 - label_smoothing, label_smoothing / n


def _ce_sum(rows, cols, labels, s, a, c):
  """Sum over rows of the CE of `s * rows @ cols.T` [b, C] against the soft targets
  `a * onehot(labels) + c` (`target_coefficients`).

  Per row: lse(l) - a l[label] - c sum(l); the label and sum terms come from the
  embeddings, so the logits exist only inside `_lse_argmax`. Also returns the
  number of rows whose argmax is the label.
  """
  rows = s * rows
  lse, idx = _lse_argmax(rows, cols)
  ce = lse - a * jnp.sum(rows * cols[labels], axis=-1)
  if not is_static_zero(c):
    ce = ce - c * (rows @ jnp.sum(cols, axis=0))
  return jnp.sum(ce), jnp.sum((idx == labels).astype(jnp.float32))


def clip_loss_local(image_emb, text_emb, scale, label_smoothing=0.0, axes=None,
                    negative_smoothing=0.0):
  """Symmetric InfoNCE over a batch split along `axes` (default: `batch_mesh_axes()`).

  Args:
    image_emb: [B, D] L2-normalised image embeddings, batch sharded over `axes`.
    text_emb: [B, D] L2-normalised text embeddings, batch sharded over `axes`.
    scale: scalar multiplicative temperature.
    label_smoothing: smoothing mass spread uniformly over the B candidates.
    axes: mesh axes of the batch split.
    negative_smoothing: smoothing mass spread over the B - 1 negatives only (may be
      a traced scalar); see `target_coefficients`.

  Returns:
    (loss, i2t_acc, t2i_acc): float32 scalars equal to the dense loss and top-1
    accuracies of `contrastive.clip`.
  """
  axes = batch_mesh_axes() if axes is None else tuple(axes)
  _check_axes(image_emb, axes)
  global_b = image_emb.shape[0]
  a, c = target_coefficients(global_b, label_smoothing, negative_smoothing)
  static_c = c if is_static_zero(c) else None  # A static 0 skips the sum term.

  def local(img, txt, s, a, c):
    img, txt, s = _f32(img), _f32(txt), _f32(s)
    c = c if static_c is None else static_c
    b = img.shape[0]
    all_img = lax.all_gather(img, axis_name=axes, tiled=True)
    all_txt = lax.all_gather(txt, axis_name=axes, tiled=True)
    labels = jnp.arange(b) + lax.axis_index(axes) * b

    # This shard's rows of each modality against all of the other: image->text,
    # then text->image. A loop, so only one direction's logits exist at a time.
    ce, hits = lax.map(
        lambda rc: _ce_sum(rc[0], rc[1], labels, s, a, c),
        (jnp.stack([img, txt]), jnp.stack([all_txt, all_img])))
    loss = lax.psum(jnp.sum(ce), axes) / (2.0 * global_b)
    acc = lax.psum(hits, axes) / global_b
    return loss, acc[0], acc[1]

  fn = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                     in_specs=(P(axes), P(axes), P(), P(), P()),
                     out_specs=(P(), P(), P()))
  return fn(image_emb, text_emb, scale, _f32(a), _f32(c))


def _siglip_block(img, txt, s, bias, positive):
  """-sum log_sigmoid(z * logits) over a b x b block (z = +1 on the diagonal if positive)."""
  logits = s * (img @ txt.T) + bias
  if positive:
    signs = 2.0 * jnp.eye(*logits.shape, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits))
  return -jnp.sum(jax.nn.log_sigmoid(-logits))


def siglip_loss_chunked(image_emb, text_emb, scale, bias, axes=None):
  """Pairwise sigmoid loss over a batch split along `axes` (default: `batch_mesh_axes()`).

  Args:
    image_emb: [B, D] L2-normalised image embeddings, batch sharded over `axes`.
    text_emb: [B, D] L2-normalised text embeddings, batch sharded over `axes`.
    scale: scalar multiplicative temperature t.
    bias: scalar logit bias b.
    axes: mesh axes of the batch split.

  Returns:
    The float32 scalar loss, equal to `contrastive.siglip_loss_from_embeddings`.
  """
  axes = batch_mesh_axes() if axes is None else tuple(axes)
  _check_axes(image_emb, axes)
  global_b = image_emb.shape[0]
  n = _axes_size(axes)
  # Shard k receives the texts of shard k + 1 each round.
  perm = [(j, (j - 1) % n) for j in range(n)]
  neg_block = jax.checkpoint(
      lambda img, txt, s, bias: _siglip_block(img, txt, s, bias, positive=False))

  def local(img, txt, s, bias):
    img, txt, s, bias = _f32(img), _f32(txt), _f32(s), _f32(bias)
    total = jax.checkpoint(
        lambda *a: _siglip_block(*a, positive=True))(img, txt, s, bias)

    def round_(_, carry):
      txt, total = carry
      txt = lax.ppermute(txt, axes, perm)
      return txt, total + neg_block(img, txt, s, bias)

    _, total = lax.fori_loop(0, n - 1, round_, (txt, total))
    return lax.psum(total, axes) / global_b

  fn = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                     in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return fn(image_emb, text_emb, scale, bias)
