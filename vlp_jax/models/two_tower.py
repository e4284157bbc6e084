"""Two-tower image-text model (CLIP, SigLIP, LiT): ViT + text transformer."""
import flax.linen as nn
import ml_collections

from vlp_jax.models import builders, heads, layers, macs, text, vit
from vlp_jax.registry import MODELS


@MODELS.register("two_tower")
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

  @classmethod
  def forward_macs(cls, config, train=True):
    """Per-sample forward multiply-adds: image and text towers, the two projections
    ('heads'), one row of the contrastive logits; no decoder."""
    m = config.model
    n = macs.image_tokens(m, config.data.image_size, train)
    width = builders.tower_kwargs(m.image, None)["width"]
    return {"image": macs.vit_macs(m.image, n), "text": macs.text_macs(m.text),
            "decoder": 0, "heads": (width + m.text.width) * m.embed_dim,
            "logits": macs.contrastive_logits_macs(config)}

  @classmethod
  def tower_macs(cls, config, tower, train=True):
    """`embed_image` / `embed_text`: the tower and its projection."""
    m = config.model
    if tower == "image":
      n = macs.image_tokens(m, config.data.image_size, train)
      width = builders.tower_kwargs(m.image, None)["width"]
      return macs.vit_macs(m.image, n) + width * m.embed_dim
    if tower == "text":
      return macs.text_macs(m.text) + m.text.width * m.embed_dim
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}.")

  def setup(self):
    cfg = self.config
    opts = layers.options_from_config(cfg)
    self.img = vit.ViT(**builders.tower_kwargs(cfg.image, self.dtype, opts))
    self.txt = text.TextTransformer(**builders.text_kwargs(cfg.text, self.dtype,
                                                           opts=opts))
    self.img_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.scale = heads.LogitScale(**builders.scale_kwargs(cfg))

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
