"""M3AE: multimodal masked autoencoder (Geng et al., 2022, arXiv 2205.14204).

One encoder over [CLS] + image patches + text tokens, trained by reconstructing what
was masked, as the authors' JAX implementation (`m3ae/model.py`) does:

- Encoder input: a learned [CLS]; the kept patches (linear patch embedding + fixed 2-D
  sin-cos positions + an image type embedding); the kept text tokens (token
  embedding + fixed 1-D sin-cos positions + a text type embedding). Sizes are those
  of `config.model.image` (variant or width/depth/mlp_dim/num_heads/patch_size);
  `config.model.text` gives only `vocab_size` (its width/depth are not read).
- Masking: keep int(L (1 - ratio)) positions of each modality, image and text drawn
  independently, by ONE random permutation shared by the whole batch (the noise has
  shape [L], not [B, L]). Text positions are drawn among all L positions, padding
  included; a kept padding token stays in the sequence but is masked as an attention
  key. The draw uses the 'dropout' rng stream (the train step's
  fold_in(state.rng, step): deterministic and resumable); without one (evaluation) a
  fixed key.
- Decoder: the encoder output projected to `m3ae.decoder_width`; separate image and
  text mask tokens fill the masked positions, the sequence is unshuffled, fixed sin-cos
  positions and decoder type embeddings are added; `decoder_depth` pre-LN blocks with
  the text padding mask; linear heads to p*p*3 pixels per patch and to vocabulary
  logits per text position.
- Outputs for the objectives (`objectives/m3ae.py`): m3ae_pixel_pred [B, N, p*p*3],
  m3ae_pixel_target (the batch image patchified: the pipeline's dataset-normalised
  pixels), m3ae_image_mask [B, N] (1 = masked), m3ae_text_logits [B, L, V],
  m3ae_text_mask [B, L] (1 = masked and not padding: the text targets).

Optional contrastive head (`m3ae.contrastive`, not in the paper): the encoder also
runs on the whole image alone and the text alone; their pooled outputs, projected to
`embed_dim` and L2-normalised, are image_emb / text_emb with logit_scale, for the
'clip' / 'siglip' objectives and the zero-shot and retrieval evaluators.

`embed_image` is the encoder on the whole image alone (the authors' linear-probe
`forward_representation`), pooled by `m3ae.pool` ('cls': the [CLS] output; 'gap':
the mean of the patch outputs), projected when the contrastive head is on.
`embed_text` exists only with the contrastive head (else a ConfigError: a masked
autoencoder has no text embedding to compare with images).
"""
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlp_jax import errors
from vlp_jax.models import builders, heads, layers, macs, text
from vlp_jax.registry import MODELS

POOLS = ("cls", "gap")
CONTRASTIVE_OUTPUTS = ("image_emb", "text_emb", "logit_scale")
OUTPUTS = ("m3ae_pixel_pred", "m3ae_pixel_target", "m3ae_image_mask",
           "m3ae_text_logits", "m3ae_text_mask")
CONTRASTIVE_SWITCH = "config.model.m3ae.contrastive=True"


def keep_count(length: int, mask_ratio: float) -> int:
  """Positions kept of `length` at `mask_ratio`: int(length * (1 - ratio)), as the
  authors' code (may be 0)."""
  return int(length * (1.0 - mask_ratio))


def sincos_1d(dim: int, positions) -> np.ndarray:
  """[M, dim] fixed sin-cos embedding of positions [M] (sin half, then cos half)."""
  if dim % 2:
    raise ValueError(f"sin-cos position embeddings need an even width, got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(dim: int, num_patches: int) -> np.ndarray:
  """[N, dim] fixed 2-D sin-cos embedding of a square grid of N patches in row-major
  order (MAE's layout: the first half encodes the column, the second the row)."""
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches or dim % 4:
    raise ValueError(f"2-D sin-cos positions need a square grid and a width divisible "
                     f"by 4, got {num_patches} patches and width {dim}.")
  cols, rows = np.meshgrid(np.arange(side), np.arange(side))
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def patchify(images, patch_size: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] in row-major patch order (as vit.ViT)."""
  _, h, w, _ = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"Image size {h}x{w} is not divisible by patch size {patch_size}.")
  return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)",
                          p1=patch_size, p2=patch_size)


def shared_masking(rng, length: int, keep: int):
  """One random permutation of `length` positions for the whole batch ->
  (kept position ids [keep] in permutation order, restore ids [length] (the inverse
  permutation), mask [length] float32, 1 = masked)."""
  shuffle = jnp.argsort(jax.random.uniform(rng, (length,), jnp.float32))
  restore = jnp.argsort(shuffle)
  return shuffle[:keep], restore, (restore >= keep).astype(jnp.float32)


def dims(config) -> dict:
  """The sizes M3AE reads from the full `config` (encoder from model.image, decoder
  from model.m3ae, N patches from data.image_size, L = model.text.context_length)."""
  m = config.model
  kw = builders.tower_kwargs(m.image, None)
  n = (config.data.image_size // kw["patch_size"]) ** 2
  length = m.text.context_length
  return dict(width=kw["width"], depth=kw["depth"], mlp=kw["mlp_dim"],
              patch_dim=kw["patch_size"] ** 2 * 3, n=n, length=length,
              vocab=m.text.vocab_size, dec_width=m.m3ae.decoder_width,
              dec_depth=m.m3ae.decoder_depth, dec_mlp=m.m3ae.decoder_mlp_dim,
              keep_img=keep_count(n, m.m3ae.image_mask_ratio),
              keep_txt=keep_count(length, m.m3ae.text_mask_ratio),
              embed_dim=m.embed_dim)


@MODELS.register("m3ae")
class M3AE(nn.Module):
  """Masked multimodal autoencoder; outputs `OUTPUTS` (+ the contrastive ones)."""
  config: ml_collections.ConfigDict
  dtype: object

  OUTPUT_SWITCHES = dict({o: CONTRASTIVE_SWITCH for o in CONTRASTIVE_OUTPUTS},
                         logit_bias=CONTRASTIVE_SWITCH
                         + " and config.model.use_logit_bias=True")

  @classmethod
  def outputs(cls, cfg):
    """Names of the outputs `__call__` returns for model config `cfg`."""
    out = set(OUTPUTS)
    if cfg.m3ae.contrastive:
      out.update(CONTRASTIVE_OUTPUTS)
      if cfg.use_logit_bias:
        out.add("logit_bias")
    return frozenset(out)

  @classmethod
  def forward_macs(cls, config, train=True):
    """Per-sample forward multiply-adds: 'encoder' (kept patches' embedding and the
    encoder over [CLS] + kept patches + kept tokens), 'decoder' (projection and
    blocks over all 1 + N + L positions), 'heads' (pixel and vocabulary heads over
    every position, contrastive projections), 'image' / 'text' (the contrastive
    head's unmasked single-modality encoder passes; 0 without it) and 'logits' (one
    row of the B x B contrastive logits). `train` changes nothing: the masked
    reconstruction is the model's forward in training and evaluation alike."""
    del train
    d = dims(config)
    w, kept = d["width"], 1 + d["keep_img"] + d["keep_txt"]
    full = 1 + d["n"] + d["length"]
    contrastive = config.model.m3ae.contrastive
    return {
        "encoder": (d["keep_img"] * d["patch_dim"] * w
                    + d["depth"] * macs.block_macs(kept, w, d["mlp"])),
        "decoder": (kept * w * d["dec_width"]
                    + d["dec_depth"] * macs.block_macs(full, d["dec_width"],
                                                       d["dec_mlp"])),
        "heads": (d["n"] * d["dec_width"] * d["patch_dim"]
                  + d["length"] * d["dec_width"] * d["vocab"]
                  + (2 * w * d["embed_dim"] if contrastive else 0)),
        "image": cls._encoder_only(config, "image") if contrastive else 0,
        "text": cls._encoder_only(config, "text") if contrastive else 0,
        "logits": macs.contrastive_logits_macs(config) if contrastive else 0,
    }

  @classmethod
  def _encoder_only(cls, config, tower):
    """The encoder over [CLS] + all patches (embedding included) or + all tokens."""
    d = dims(config)
    w = d["width"]
    if tower == "image":
      return d["n"] * d["patch_dim"] * w + d["depth"] * macs.block_macs(
          1 + d["n"], w, d["mlp"])
    if tower == "text":
      return d["depth"] * macs.block_macs(1 + d["length"], w, d["mlp"])
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}.")

  @classmethod
  def tower_macs(cls, config, tower, train=True):
    """`embed_image` / `embed_text`: the encoder on one whole modality, plus the
    projection when the contrastive head is on."""
    del train
    proj = dims(config)["width"] * config.model.embed_dim
    return cls._encoder_only(config, tower) + (
        proj if config.model.m3ae.contrastive else 0)

  def setup(self):
    cfg, m = self.config, self.config.m3ae
    if m.pool not in POOLS:
      raise ValueError(f"config.model.m3ae.pool={m.pool!r} is not one of {POOLS}.")
    opts = layers.options_from_config(cfg)
    kw = builders.tower_kwargs(cfg.image, self.dtype, opts)
    w, wd = kw["width"], m.decoder_width
    init = lambda std, axes: nn.with_logical_partitioning(
        nn.initializers.normal(stddev=std), axes)
    vec = lambda name, width: self.param(name, init(0.02, (None, None, "embed")),
                                         (1, 1, width), jnp.float32)
    self.patch_embed = layers.dense(w, ("patch", "embed"), self.dtype)
    # N(0, 1) as the authors' text embedding (its scale matches the sin-cos positions).
    self.token_embed = nn.Embed(cfg.text.vocab_size, w, dtype=self.dtype,
                                param_dtype=jnp.float32,
                                embedding_init=init(1.0, ("vocab", "embed")))
    self.cls_token = vec("cls_token", w)
    self.encoder_image_type = vec("encoder_image_type", w)
    self.encoder_text_type = vec("encoder_text_type", w)
    self.decoder_image_type = vec("decoder_image_type", wd)
    self.decoder_text_type = vec("decoder_text_type", wd)
    self.image_mask_token = vec("image_mask_token", wd)
    self.text_mask_token = vec("text_mask_token", wd)
    self.encoder = layers.Transformer(kw["depth"], kw["num_heads"], kw["mlp_dim"],
                                      self.dtype, dropout=kw["dropout"], opts=opts)
    # (encoder width, decoder width): 'embed_img' as CoCa's caption-pool projection.
    self.decoder_proj = layers.dense(wd, ("embed_img", "embed"), self.dtype)
    self.decoder = layers.Transformer(m.decoder_depth, m.decoder_heads,
                                      m.decoder_mlp_dim, self.dtype,
                                      dropout=kw["dropout"], opts=opts)
    self.pixel_head = layers.dense(kw["patch_size"] ** 2 * 3, ("embed", "patch"),
                                   self.dtype)
    self.text_head = layers.dense(cfg.text.vocab_size, ("embed", "vocab"), self.dtype)
    if m.contrastive:
      self.img_proj = heads.Projection(cfg.embed_dim, self.dtype)
      self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype)
      self.scale = heads.LogitScale(**builders.scale_kwargs(cfg))

  # --- Encoder inputs.

  def _patch_size(self):
    return builders.tower_kwargs(self.config.image, None)["patch_size"]

  def _image_input(self, patches, ids=None):
    """Raw patches [B, N, P] (the `ids` among them) -> encoder tokens."""
    pos = jnp.asarray(sincos_2d(self.cls_token.shape[-1], patches.shape[1]))
    if ids is not None:  # Embedding only the kept patches skips the masked work.
      patches, pos = patches[:, ids], pos[ids]
    x = self.patch_embed(patches.astype(self.dtype))
    return x + (pos[None] + self.encoder_image_type).astype(self.dtype)

  def _text_input(self, tokens, ids=None):
    """Token ids [B, L] (the `ids` among them) -> encoder tokens."""
    pos = jnp.asarray(sincos_1d(self.cls_token.shape[-1], np.arange(tokens.shape[1])))
    tokens = jnp.asarray(tokens)
    if ids is not None:
      tokens, pos = tokens[:, ids], pos[ids]
    x = self.token_embed(tokens)
    return x + (pos[None] + self.encoder_text_type).astype(self.dtype)

  def _encode(self, parts, text_valid, train):
    """[CLS] + the concatenated `parts` through the encoder; `text_valid` [B, T]
    (the last part's real tokens, or None) masks padding keys."""
    b, w = parts[0].shape[0], parts[0].shape[-1]
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token.astype(self.dtype),
                                          (b, 1, w))] + list(parts), axis=1)
    x = layers.constrain(x, ("batch", "length", "embed"))
    mask = None
    if text_valid is not None:
      head = jnp.ones((b, x.shape[1] - text_valid.shape[1]), bool)
      mask = jnp.concatenate([head, text_valid], axis=1)[:, None, None, :]
    return self.encoder(x, mask=mask, train=train)

  def _pool(self, x, valid=None):
    """Encoder output [B, 1 + T, W] -> [B, W] by `m3ae.pool` ('gap': mean over the
    real tokens after [CLS])."""
    if self.config.m3ae.pool == "cls":
      return x[:, 0]
    return text.pool_features(x[:, 1:], jnp.ones(x.shape[:2], bool)[:, 1:]
                              if valid is None else valid, "mean")

  # --- The interface.

  def embed_image(self, images, train=False):
    """-> (pooled (projected, L2-normalised with the contrastive head) [B, D or W],
    patch outputs [B, N, W]) of the encoder on the whole image alone."""
    patches = patchify(images, self._patch_size())
    x = self._encode([self._image_input(patches)], None, train)
    pooled = self._pool(x)
    if self.config.m3ae.contrastive:
      pooled = self.img_proj(pooled)
    return pooled, x[:, 1:]

  def embed_text(self, tokens, train=False):
    """-> (text_emb [B, D], token outputs [B, L, W]) of the encoder on the text alone;
    only with the contrastive head."""
    if not self.config.m3ae.contrastive:
      raise errors.ConfigError(
          "Model 'm3ae' has no text embedding without its contrastive head, so the "
          "zero-shot and retrieval evaluators cannot run: set "
          f"{CONTRASTIVE_SWITCH} (and add 'clip' to config.objectives), or evaluate "
          "with the 'linear_probe' / 'fewshot' evaluators, which read image "
          "features only.")
    valid = jnp.asarray(tokens) != text.PAD_ID
    x = self._encode([self._text_input(tokens)], valid, train)
    return self.txt_proj(self._pool(x, valid)), x[:, 1:]

  def _decoder_part(self, y, restore, mask_token, pos, type_emb):
    """Kept decoder tokens [B, k, Wd] + mask tokens, unshuffled to [B, L, Wd], plus
    positions and the type embedding."""
    b, k, wd = y.shape
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, restore.shape[0] - k, wd))
    y = jnp.concatenate([y, fill], axis=1)[:, restore]
    return y + (jnp.asarray(pos)[None] + type_emb).astype(self.dtype)

  def __call__(self, batch, train: bool = False):
    missing = [k for k in ("image", "text") if k not in batch]
    if missing:
      raise ValueError(f"Model 'm3ae' reconstructs image and text together; the "
                       f"batch lacks {missing}.")
    m = self.config.m3ae
    tokens = jnp.asarray(batch["text"])
    target = patchify(jnp.asarray(batch["image"], jnp.float32), self._patch_size())
    b, n = target.shape[:2]
    length = tokens.shape[1]
    keep_img, keep_txt = keep_count(n, m.image_mask_ratio), keep_count(
        length, m.text_mask_ratio)
    rng = (self.make_rng("dropout") if self.has_rng("dropout")
           else jax.random.PRNGKey(0))
    img_rng, txt_rng = jax.random.split(rng)
    img_ids, img_restore, img_mask = shared_masking(img_rng, n, keep_img)
    txt_ids, txt_restore, txt_mask = shared_masking(txt_rng, length, keep_txt)
    valid = tokens != text.PAD_ID
    x = self._encode([self._image_input(target, img_ids),
                      self._text_input(tokens, txt_ids)], valid[:, txt_ids], train)

    y = self.decoder_proj(x)
    wd = y.shape[-1]
    img_y = self._decoder_part(y[:, 1:1 + keep_img], img_restore, self.image_mask_token,
                               sincos_2d(wd, n), self.decoder_image_type)
    txt_y = self._decoder_part(y[:, 1 + keep_img:], txt_restore, self.text_mask_token,
                               sincos_1d(wd, np.arange(length)), self.decoder_text_type)
    y = layers.constrain(jnp.concatenate([y[:, :1], img_y, txt_y], axis=1),
                         ("batch", "length", "embed"))
    dec_valid = jnp.concatenate([jnp.ones((b, 1 + n), bool), valid], axis=1)
    y = self.decoder(y, mask=dec_valid[:, None, None, :], train=train)
    out = {
        "m3ae_pixel_pred": self.pixel_head(y[:, 1:1 + n]),
        "m3ae_pixel_target": target,
        "m3ae_image_mask": jnp.broadcast_to(img_mask, (b, n)),
        "m3ae_text_logits": self.text_head(y[:, 1 + n:]),
        "m3ae_text_mask": txt_mask[None] * valid.astype(jnp.float32),
    }
    if m.contrastive:
      out.update(self.scale())
      out["image_emb"] = self.embed_image(batch["image"], train)[0]
      out["text_emb"] = self.embed_text(tokens, train)[0]
    return out
