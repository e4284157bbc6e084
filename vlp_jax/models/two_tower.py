"""Two-tower image-text model (CLIP, SigLIP, LiT): ViT + text transformer."""
import flax.linen as nn
import ml_collections

from vlp_jax.models import heads, layers, text, vit


def tower_kwargs(cfg: ml_collections.ConfigDict, dtype, opts=None):
  """Image-tower keyword arguments from `model.image` (variant plus explicit fields)."""
  kw = vit.parse_variant(cfg.get("variant"))
  for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
    if cfg.get(key):
      kw[key] = cfg[key]
  missing = {"width", "depth", "mlp_dim", "num_heads", "patch_size"} - set(kw)
  if missing:
    raise ValueError(f"model.image needs a variant like 'B/16' or explicit "
                     f"{sorted(missing)}.")
  return dict(kw, pool=cfg.pool, dtype=dtype, dropout=cfg.get("dropout", 0.0),
              patch_dropout=cfg.get("patch_dropout", 0.0),
              opts=opts or layers.TransformerOptions())


def text_kwargs(cfg: ml_collections.ConfigDict, dtype, causal=None, pool=None,
                opts=None):
  return dict(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth,
              mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads,
              context_length=cfg.context_length,
              causal=cfg.causal if causal is None else causal,
              pool=cfg.pool if pool is None else pool, dtype=dtype,
              dropout=cfg.get("dropout", 0.0), opts=opts or layers.TransformerOptions())


def scale_kwargs(cfg: ml_collections.ConfigDict):
  return dict(scale_init=cfg.logit_scale_init, max_scale=cfg.logit_scale_max,
              bias_init=cfg.logit_bias_init, use_bias=cfg.use_logit_bias)


class TwoTower(nn.Module):
  """Outputs image_emb/text_emb (normalised), image_tokens/text_tokens, logit_scale(/bias)."""
  config: ml_collections.ConfigDict
  dtype: object

  # Outputs produced only under a setting: output -> the setting.
  OUTPUT_SWITCHES = {"logit_bias": "config.model.use_logit_bias=True"}

  @classmethod
  def outputs(cls, cfg):
    """Names of the outputs `__call__` returns for model config `cfg` (both inputs)."""
    out = {"image_emb", "text_emb", "image_tokens", "text_tokens", "logit_scale"}
    return frozenset(out | ({"logit_bias"} if cfg.use_logit_bias else set()))

  def setup(self):
    cfg = self.config
    opts = layers.options_from_config(cfg)
    self.img = vit.ViT(**tower_kwargs(cfg.image, self.dtype, opts))
    self.txt = text.TextTransformer(**text_kwargs(cfg.text, self.dtype, opts=opts))
    self.img_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.scale = heads.LogitScale(**scale_kwargs(cfg))

  def embed_image(self, images, train=False):
    pooled, tokens = self.img(images, train=train)
    return self.img_proj(pooled), tokens

  def embed_text(self, tokens, train=False):
    pooled, feats = self.txt(tokens, train=train)
    return self.txt_proj(pooled), feats

  def __call__(self, batch, train: bool = False):
    out = dict(self.scale())
    if "image" in batch:
      out["image_emb"], out["image_tokens"] = self.embed_image(batch["image"], train)
    if "text" in batch:
      out["text_emb"], out["text_tokens"] = self.embed_text(batch["text"], train)
    return out
