"""FILIP: token-wise late-interaction contrastive loss (Yao et al., arXiv 2111.07783).

Image i has N patch tokens x_ik and text j has L token slots y_jr of which the
real (unpadded) ones form R_j; all are L2-normalised per token, so the token
similarity is the cosine S_ij[k, r] = <x_ik, y_jr>. The two late-interaction
scores (paper eq. 4 and 5) are

    s^I_ij = 1/N     sum_k       max_{r in R_j} S_ij[k, r]   (image -> text)
    s^T_ij = 1/|R_j| sum_{r in R_j} max_k     S_ij[k, r]     (text -> image)

Padded text tokens never enter a max (they are set to -inf, not zeroed, so they
cannot win when every real similarity is negative) and s^T averages over |R_j|.
s^I and s^T are two different [B, B] matrices; s^T is not (s^I)^T. With scale t
(= 1/tau) the loss is the symmetric InfoNCE of the paper (eq. 2, 3):

    L = 1/2 [ mean_i CE(t s^I_i., i) + mean_j CE(t s^T_.j, j) ],

i.e. the image->text term takes softmax rows of s^I, the text->image term softmax
columns of s^T.

`token_similarities` computes both matrices in chunks of text rows (`lax.map`, the
max reduced inside each chunk, each chunk rematerialised in the backward pass), so
the [Bi, Bt, N, L] similarity tensor never exists at once. Under a mesh that
splits the batch, the registered `filip` objective uses the ring form in
`sharded_filip.py` (same value and gradient); `distributed: 'dense'` forces this
dense one.

Not implemented: the paper's efficiency trick of keeping only the top 25% of
tokens per sample before the all-gather (section 3.1.2). It changes the loss
(it is an approximation, off by default in the authors' port), so it is left out
rather than offered as an option.
"""
import jax
from jax import lax
import jax.numpy as jnp

from vlp_jax.objectives import contrastive
from vlp_jax.registry import OBJECTIVES

DEFAULT_BLOCK = 64


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _block_scores(img, txt, mask):
  """(s^I, s^T) [Bi, b] for image tokens [Bi, N, d] against text tokens [b, L, d]."""
  sim = jnp.einsum("ind,jld->ijnl", img, txt, preferred_element_type=jnp.float32)
  real = mask[None, :, None, :]                                   # [1, b, 1, L]
  best_txt = jnp.max(jnp.where(real, sim, -jnp.inf), axis=-1)     # [Bi, b, N]
  nonempty = jnp.any(mask, axis=-1)[None, :, None]
  # A text without real tokens has no max; its scores are defined as 0.
  i2t = jnp.mean(jnp.where(nonempty, best_txt, 0.0), axis=-1)
  best_img = jnp.max(sim, axis=2)                                 # [Bi, b, L]
  count = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
  t2i = jnp.sum(jnp.where(mask[None], best_img, 0.0), axis=-1) / count
  return i2t, t2i


def _chunked(fn, xs, block, *args):
  """`fn(chunk, *args)` over `block`-row chunks of the tuple `xs` (leading size n).

  With n <= block: `fn(xs, *args)`. Otherwise `xs` is zero-padded to a multiple of
  `block` (the caller drops the pad rows) and the outputs come stacked as
  [chunks, ...]. Each chunk is rematerialised in the backward pass, so only its
  inputs are saved.
  """
  n = xs[0].shape[0]
  if n <= block:
    return fn(xs, *args)
  chunks = -(-n // block)
  pad = chunks * block - n
  xs = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in xs)
  xs = tuple(x.reshape((chunks, block) + x.shape[1:]) for x in xs)
  return lax.map(jax.checkpoint(lambda c: fn(c, *args)), xs)


def token_similarities(image_tokens, text_tokens, text_mask, block=DEFAULT_BLOCK,
                       image_block=None):
  """FILIP's token-wise scores (s^I, s^T) without temperature.

  Args:
    image_tokens: [Bi, N, d] image tokens, L2-normalised per token (any float dtype;
      the products accumulate in float32).
    text_tokens: [Bt, L, d] text tokens, L2-normalised per token.
    text_mask: [Bt, L] bool or 0/1, true for real tokens (pads are excluded).
    block: text rows per chunk; the largest live similarity block is
      [Bi (or image_block), block, N, L] float32.
    image_block: optional image rows per chunk (None: all Bi at once).

  Returns:
    (i2t, t2i): float32 [Bi, Bt]. i2t[i, j] averages over image i's tokens the best
    cosine with a real token of text j; t2i[i, j] averages over text j's real
    tokens the best cosine with a token of image i. A text with no real token
    scores 0 in both.
  """
  if image_tokens.ndim != 3 or text_tokens.ndim != 3:
    raise ValueError(f"token_similarities needs image tokens [Bi, N, d] and text "
                     f"tokens [Bt, L, d]; got {image_tokens.shape} and "
                     f"{text_tokens.shape}. Pass per-token (not pooled) embeddings.")
  if text_mask.shape != text_tokens.shape[:2]:
    raise ValueError(f"text_mask {text_mask.shape} must be [Bt, L] = "
                     f"{text_tokens.shape[:2]}, one flag per text token.")
  if int(block) < 1 or (image_block is not None and int(image_block) < 1):
    raise ValueError(f"block={block}, image_block={image_block}: chunk sizes must be "
                     ">= 1 (image_block may be None).")
  mask = jnp.asarray(text_mask).astype(bool)
  bi, bt = image_tokens.shape[0], text_tokens.shape[0]

  def over_texts(txt_chunk, img):
    return _block_scores(img, *txt_chunk)

  def scores(img_chunk):
    (img,) = img_chunk
    out = _chunked(over_texts, (text_tokens, mask), int(block), img)
    if bt <= int(block):
      return out
    # [chunks, Bi, block] -> [Bi, Bt]
    return tuple(jnp.moveaxis(o, 0, 1).reshape(o.shape[1], -1)[:, :bt] for o in out)

  if image_block is None or bi <= int(image_block):
    return scores((image_tokens,))
  out = _chunked(scores, (image_tokens,), int(image_block))
  return tuple(o.reshape(-1, bt)[:bi] for o in out)


def filip_loss_from_tokens(image_tokens, text_tokens, text_mask, scale,
                           label_smoothing=0.0, block=DEFAULT_BLOCK):
  """Dense FILIP loss; matching pairs are on the diagonal.

  Args:
    image_tokens: [B, N, d] image tokens, L2-normalised per token.
    text_tokens: [B, L, d] text tokens, L2-normalised per token.
    text_mask: [B, L] true for real text tokens.
    scale: scalar multiplicative temperature (1 / tau).
    label_smoothing: smoothing mass spread uniformly over the B candidates.
    block: text rows per chunk of `token_similarities`.

  Returns:
    (loss, (i2t, t2i)): the float32 scalar loss and the scaled [B, B] logits
    `scale * s^I` (rows: images -> texts) and `scale * s^T` (columns: texts ->
    images).
  """
  if image_tokens.shape[0] != text_tokens.shape[0]:
    raise ValueError(f"FILIP pairs image i with text i; got {image_tokens.shape[0]} "
                     f"images and {text_tokens.shape[0]} texts. Pass paired batches.")
  s_i, s_t = token_similarities(image_tokens, text_tokens, text_mask, block=block)
  s = _f32(scale)
  i2t, t2i = s * s_i, s * s_t
  loss = 0.5 * (jnp.mean(contrastive.smoothed_ce(i2t, label_smoothing)) +
                jnp.mean(contrastive.smoothed_ce(t2i.T, label_smoothing)))
  return loss, (i2t, t2i)


FILIP_OPTIONS = {"distributed": "auto", "block": DEFAULT_BLOCK, "label_smoothing": 0.0}


def check_filip_options(cfg):
  """FILIP's options with defaults filled in, checked (ValueError naming the fix)."""
  if "token_fraction" in (cfg or {}):
    raise ValueError("config.objective_cfg.filip.token_fraction: the paper's top-k "
                     "token exchange is not implemented (it makes the loss depend on "
                     "how the batch is split); remove the option.")
  cfg = contrastive.check_options(cfg, "filip", FILIP_OPTIONS)
  cfg["label_smoothing"] = contrastive.check_fraction(cfg["label_smoothing"],
                                                      "label_smoothing", "filip")
  if isinstance(cfg["block"], bool) or not isinstance(cfg["block"], int) or (
      cfg["block"] < 1):
    raise ValueError(f"config.objective_cfg.filip.block={cfg['block']!r} must be a "
                     "positive integer (text rows per similarity chunk).")
  return cfg


@OBJECTIVES.register(
    "filip", reads=("image_token_emb", "text_token_emb", "text_token_mask",
                    "logit_scale"), batch_global=True, check=check_filip_options)
def filip(outputs, batch, cfg):
  """FILIP objective. Options: `label_smoothing` (0.0), `block` (text rows per
  similarity chunk, 64), `distributed` ('auto'|'dense')."""
  del batch
  cfg = check_filip_options(cfg)
  ls, block = cfg["label_smoothing"], cfg["block"]
  scale = outputs["logit_scale"]
  img, txt = outputs["image_token_emb"], outputs["text_token_emb"]
  mask = outputs["text_token_mask"]
  axes = contrastive.batch_axes(cfg, img.shape[0])
  if axes:
    from vlp_jax.objectives import sharded_filip  # pylint: disable=g-import-not-at-top
    loss, i2t_acc, t2i_acc = sharded_filip.filip_loss_ring(
        img, txt, mask, scale, label_smoothing=ls, block=block, axes=axes)
  else:
    loss, (i2t, t2i) = filip_loss_from_tokens(img, txt, mask, scale,
                                              label_smoothing=ls, block=block)
    labels = jnp.arange(i2t.shape[0])
    i2t_acc = jnp.mean((jnp.argmax(i2t, axis=1) == labels).astype(jnp.float32))
    t2i_acc = jnp.mean((jnp.argmax(t2i, axis=0) == labels).astype(jnp.float32))
  metrics = {"loss": loss, "i2t_acc": i2t_acc, "t2i_acc": t2i_acc,
             "logit_scale": _f32(scale)}
  return loss, metrics


def filip_similarity_macs(global_batch, image_tokens, text_tokens, dim):
  """Per-sample multiply-adds of the token-wise similarities over the global batch.

  One image against all `global_batch` texts: global_batch * N * L * d products
  (N image tokens, L text token slots incl. pads, width d). s^I and s^T share these
  products, so both directions cost this once; maxima and means are not counted.
  Add it to a family's forward count (like `macs.contrastive_logits_macs`, which it
  replaces for FILIP); `vlp_jax/perf/flops.py` then counts training as 3x forward,
  with no credit for the chunks the backward pass rematerialises.
  """
  return int(global_batch) * int(image_tokens) * int(text_tokens) * int(dim)


def filip_logits_macs(config, train=True):
  """`filip_similarity_macs` for a config: B = config.batch_size, N = the patch
  tokens of config.model at config.data.image_size (after patch dropout when
  training), L = config.model.text.context_length, d = config.model.token_embed_dim
  (config.model.embed_dim when 0)."""
  from vlp_jax.models import macs  # pylint: disable=g-import-not-at-top
  n = macs.vit_output_tokens(config.model.image, macs.image_tokens(
      config.model, config.data.image_size, train))
  d = config.model.get("token_embed_dim", 0) or config.model.embed_dim
  return filip_similarity_macs(config.batch_size, n, config.model.text.context_length,
                               d)
