"""UniCL: contrastive learning with several positives per row (Yang et al. 2022).

Example k of the global batch of B carries a label y_k (0: an image-text caption
pair; > 0: a class, `batch['label']`) and an image id (`batch['image_id']`). Image i
and text j are positives, P_ij = 1, when

    i == j,  or  y_i == y_j > 0,  or (option `same_image`) id_i == id_j.

A caption pair is thus a positive only of itself (its own unique label: unique over
the global batch, as it is defined by the global row index), classification
examples of one class are all positives of each other, and with `same_image` so are
several captions of one image. P is symmetric. With logits s_ij = t <u_i, v_j>
(t = logit_scale), P(i) = {j : P_ij = 1} and the soft targets

    T_ij = (1 - alpha) / |P(i)|   for j in P(i)
    T_ij = alpha / (B - |P(i)|)   otherwise            (alpha = `negative_smoothing`)

(alpha = 0: T_ij = P_ij / |P(i)|, the paper's targets; a row whose every candidate is
a positive keeps T_ij = 1 / B), the two directions are

    L_i2t = -(1/B) sum_i sum_j T_ij log softmax_j(s_i.)_j      (rows, over texts)
    L_t2i = -(1/B) sum_j sum_i T_ji log softmax_i(s_.j)_i      (columns, over images)

and the loss is (L_i2t + L_t2i) / 2, which equals `clip` exactly when every label
is unique. The paper writes the bidirectional loss as the sum L_i2t + L_t2i; the
mean is used here so that the two coincide (a `unicl` weight of 2 gives the sum).
alpha > 0 softens the negatives as PyramidCLIP does (Gao et al. 2022).

Under a mesh that splits the batch `unicl` uses `unicl_loss_local`: each shard
all-gathers the other modality's embeddings (differentiably), the labels and image
ids, and computes its own b x B rows of both directions (O(b * B) logits per device,
one direction at a time, rematerialised in the backward pass); value and gradient
equal the dense form. `distributed: 'dense'` forces the dense form.
"""
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlp_jax.objectives import contrastive
from vlp_jax.objectives import sharded
from vlp_jax.registry import OBJECTIVES

_f32 = contrastive._f32  # pylint: disable=protected-access

UNICL_OPTIONS = {"same_image": False, "negative_smoothing": 0.0, "distributed": "auto"}


def positive_mask(row_label, row_image_id, row_index, col_label, col_image_id,
                  col_index, same_image=False):
  """[r, c] bool: rows and columns that are positives of each other (see above).

  `*_index` are global row indices of the batch (they identify caption pairs);
  `*_label` are 0 for captions and > 0 for classes (negative labels count as
  captions); `*_image_id` is used only with `same_image`.
  """
  rl, cl = row_label[:, None], col_label[None, :]
  mask = (row_index[:, None] == col_index[None, :]) | ((rl > 0) & (rl == cl))
  if same_image:
    mask = mask | (row_image_id[:, None] == col_image_id[None, :])
  return mask


def targets_from_mask(mask, negative_smoothing=0.0):
  """[r, c] float32 targets T of a positive mask (rows sum to 1; see above)."""
  n = mask.shape[1]
  pos = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
  neg = n - pos
  if sharded.is_static_zero(negative_smoothing):
    return jnp.where(mask, 1.0 / pos, 0.0)
  alpha = _f32(negative_smoothing)
  has_neg = neg > 0
  on_pos = jnp.where(has_neg, (1.0 - alpha) / pos, 1.0 / pos)
  on_neg = jnp.where(has_neg, alpha / jnp.maximum(neg, 1.0), 0.0)
  return jnp.where(mask, on_pos, on_neg)


def _direction(rows, cols, s, mask, negative_smoothing):
  """(sum of the rows' soft-target CE, rows whose argmax is a positive) for the
  logits `s * rows @ cols.T` [r, c]."""
  logits = s * (rows @ cols.T)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.sum(targets_from_mask(mask, negative_smoothing) * logp, axis=-1)
  best = jnp.argmax(logits, axis=-1)
  hits = jnp.take_along_axis(mask, best[:, None], axis=1)[:, 0]
  return jnp.sum(ce), jnp.sum(hits.astype(jnp.float32))


def _both_directions(img, txt, all_img, all_txt, s, mask, negative_smoothing,
                     low_memory=True):
  """Rows `img`/`txt` [r, D] against every text / image [B, D]: (ce sums [2],
  hits [2]), image->text first. With `low_memory` one direction's logits exist at
  a time and each is rematerialised in the backward pass (the sharded form); the
  dense form, whose [B, B] logits exist anyway, skips that (faster to compile)."""
  def fn(rows, cols):
    return _direction(rows, cols, s, mask, negative_smoothing)
  if not low_memory:
    (ce_i, hit_i), (ce_t, hit_t) = fn(img, all_txt), fn(txt, all_img)
    return jnp.stack([ce_i, ce_t]), jnp.stack([hit_i, hit_t])
  fn = jax.checkpoint(fn)
  return lax.map(lambda rc: fn(*rc),
                 (jnp.stack([img, txt]), jnp.stack([all_txt, all_img])))


def unicl_loss_from_embeddings(image_emb, text_emb, scale, label, image_id,
                               same_image=False, negative_smoothing=0.0):
  """Dense UniCL loss over the whole batch.

  Args:
    image_emb, text_emb: [B, D] L2-normalised embeddings.
    scale: scalar multiplicative temperature.
    label: [B] int, 0 for caption pairs, > 0 for classes.
    image_id: [B] int, equal for rows of one image (used with `same_image`).
    same_image: rows of one image are positives of each other.
    negative_smoothing: mass alpha spread over each row's negatives.

  Returns:
    (loss, i2t_acc, t2i_acc, positives): float32 scalars; `positives` is the mean
    number of positives per row.
  """
  img, txt, s = _f32(image_emb), _f32(text_emb), _f32(scale)
  n = img.shape[0]
  index = jnp.arange(n)
  mask = positive_mask(label, image_id, index, label, image_id, index, same_image)
  ce, hits = _both_directions(img, txt, img, txt, s, mask, negative_smoothing,
                              low_memory=False)
  loss = jnp.sum(ce) / (2.0 * n)
  positives = jnp.sum(mask).astype(jnp.float32) / n
  return loss, hits[0] / n, hits[1] / n, positives


def unicl_loss_local(image_emb, text_emb, scale, label, image_id, same_image=False,
                     negative_smoothing=0.0, axes=None):
  """`unicl_loss_from_embeddings` over a batch split along `axes` (default:
  `sharded.batch_mesh_axes()`); same arguments and results, equal in value and
  gradient. Call it under `jax.set_mesh`."""
  axes = sharded.batch_mesh_axes() if axes is None else tuple(axes)
  sharded._check_axes(image_emb, axes)  # pylint: disable=protected-access
  global_b = image_emb.shape[0]
  static_alpha = sharded.is_static_zero(negative_smoothing)

  def local(img, txt, s, lab, iid, alpha):
    img, txt, s = _f32(img), _f32(txt), _f32(s)
    alpha = 0.0 if static_alpha else alpha
    b = img.shape[0]
    all_img = lax.all_gather(img, axis_name=axes, tiled=True)
    all_txt = lax.all_gather(txt, axis_name=axes, tiled=True)
    all_lab = lax.all_gather(lab, axis_name=axes, tiled=True)
    all_iid = lax.all_gather(iid, axis_name=axes, tiled=True)
    # Global indices of this shard's rows (the order of the tiled all_gather).
    rows = jnp.arange(b) + lax.axis_index(axes) * b
    mask = positive_mask(lab, iid, rows, all_lab, all_iid, jnp.arange(global_b),
                         same_image)
    ce, hits = _both_directions(img, txt, all_img, all_txt, s, mask, alpha)
    loss = lax.psum(jnp.sum(ce), axes) / (2.0 * global_b)
    acc = lax.psum(hits, axes) / global_b
    positives = lax.psum(jnp.sum(mask).astype(jnp.float32), axes) / global_b
    return loss, acc[0], acc[1], positives

  fn = jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                     in_specs=(P(axes), P(axes), P(), P(axes), P(axes), P()),
                     out_specs=(P(), P(), P(), P()))
  return fn(image_emb, text_emb, scale, jnp.asarray(label), jnp.asarray(image_id),
            _f32(negative_smoothing))


def check_unicl_options(cfg):
  """UniCL's options with defaults filled in, checked (ValueError naming the fix)."""
  cfg = contrastive.check_options(cfg, "unicl", UNICL_OPTIONS)
  cfg["negative_smoothing"] = contrastive.check_fraction(
      cfg["negative_smoothing"], "negative_smoothing", "unicl")
  if not isinstance(cfg["same_image"], bool):
    raise ValueError(f"config.objective_cfg.unicl.same_image={cfg['same_image']!r} "
                     f"must be True or False.")
  return cfg


@OBJECTIVES.register("unicl", reads=("image_emb", "text_emb", "logit_scale"),
                     batch_keys=("label", "image_id"), batch_global=True,
                     check=check_unicl_options)
def unicl(outputs, batch, cfg):
  """UniCL objective. Options: `same_image` (False), `negative_smoothing` (0.0),
  `distributed` ('auto'|'dense')."""
  cfg = check_unicl_options(cfg)
  alpha, same_image = cfg["negative_smoothing"], cfg["same_image"]
  img, txt, scale = outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"]
  args = (img, txt, scale, batch["label"], batch["image_id"], same_image, alpha)
  axes = contrastive.batch_axes(cfg, img.shape[0])
  if axes:
    loss, i2t_acc, t2i_acc, positives = unicl_loss_local(*args, axes=axes)
  else:
    loss, i2t_acc, t2i_acc, positives = unicl_loss_from_embeddings(*args)
  return loss, {"loss": loss, "i2t_acc": i2t_acc, "t2i_acc": t2i_acc,
                "positives": positives, "logit_scale": _f32(scale)}
