"""CoCa: contrastive captioner (Yu et al., 2022).

Image: ViT tokens -> attention pooler with 1 query (contrastive embedding) and one
with `num_queries` queries (what the decoder cross-attends to). Text: unimodal causal
layers (pooled at EOS = text embedding) then multimodal layers with cross-attention,
producing next-token logits: `caption_logits[:, t]` predicts `text[:, t + 1]`.
"""
import flax.linen as nn
import ml_collections

from vlp_jax.models import builders, heads, layers, macs, text, vit
from vlp_jax.registry import MODELS


@MODELS.register("coca")
class CoCa(nn.Module):
  """Outputs image_emb, text_emb, image_tokens, text_tokens, caption_logits, logit_scale."""
  config: ml_collections.ConfigDict
  dtype: object

  # Outputs produced only under a setting: output -> the setting.
  OUTPUT_SWITCHES = {"logit_bias": "config.model.use_logit_bias=True"}

  @classmethod
  def outputs(cls, cfg):
    """Names of the outputs `__call__` returns for model config `cfg` (both inputs)."""
    out = {"image_emb", "text_emb", "image_tokens", "text_tokens", "caption_logits",
           "logit_scale"}
    return frozenset(out | ({"logit_bias"} if cfg.use_logit_bias else set()))

  @classmethod
  def _image_macs(cls, config, train):
    """(contrastive path: ViT + 1-query pooler, caption path: Q-query pooler +
    projection to the text width) multiply-adds per sample."""
    m = config.model
    kw = builders.tower_kwargs(m.image, None)
    w, mlp, q = kw["width"], kw["mlp_dim"], m.decoder.num_queries
    n = macs.image_tokens(m, config.data.image_size, train)
    contrastive = macs.vit_macs(m.image, n, pool="none") + macs.pool_macs(1, n, w, mlp)
    return contrastive, macs.pool_macs(q, n, w, mlp) + q * w * m.text.width

  @classmethod
  def forward_macs(cls, config, train=True):
    """Per-sample forward multiply-adds: image (ViT and both poolers), unimodal text,
    decoder (multimodal layers and vocabulary projection), the two projections
    ('heads'), one row of the contrastive logits."""
    m = config.model
    t = m.text
    contrastive, caption = cls._image_macs(config, train)
    width = builders.tower_kwargs(m.image, None)["width"]
    decoder = (m.decoder.depth * macs.block_macs(t.context_length, t.width, t.mlp_dim,
                                                 context=m.decoder.num_queries)
               + t.context_length * t.width * t.vocab_size)
    return {"image": contrastive + caption, "text": macs.text_macs(t),
            "decoder": decoder, "heads": (width + t.width) * m.embed_dim,
            "logits": macs.contrastive_logits_macs(config)}

  @classmethod
  def tower_macs(cls, config, tower, train=True):
    """`embed_image` (without the caption pooler, which feeds only the decoder) /
    `embed_text`, each with its projection."""
    m = config.model
    if tower == "image":
      width = builders.tower_kwargs(m.image, None)["width"]
      return cls._image_macs(config, train)[0] + width * m.embed_dim
    if tower == "text":
      return macs.text_macs(m.text) + m.text.width * m.embed_dim
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}.")

  def setup(self):
    cfg = self.config
    opts = layers.options_from_config(cfg)
    img_kw = builders.tower_kwargs(cfg.image, self.dtype, opts)
    img_kw["pool"] = "none"
    self.img = vit.ViT(**img_kw)
    heads_, mlp = img_kw["num_heads"], img_kw["mlp_dim"]
    self.contrastive_pool = layers.AttentionPool(heads_, mlp, 1, self.dtype, opts=opts)
    self.caption_pool = layers.AttentionPool(heads_, mlp, cfg.decoder.num_queries,
                                             self.dtype, opts=opts)
    self.caption_pool_proj = layers.dense(cfg.text.width, ("embed_img", "embed"),
                                          self.dtype)
    self.txt = text.TextTransformer(**builders.text_kwargs(
        cfg.text, self.dtype, causal=True, pool="eos", opts=opts))
    self.decoder = layers.Transformer(
        cfg.decoder.depth, cfg.text.num_heads, cfg.text.mlp_dim, self.dtype,
        causal=True, cross_attention=True, dropout=cfg.text.get("dropout", 0.0),
        opts=opts)
    self.vocab_proj = layers.dense(cfg.text.vocab_size, ("embed", "vocab"), self.dtype)
    self.img_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.scale = heads.LogitScale(**builders.scale_kwargs(cfg))

  def encode_image(self, images, train=False):
    """-> (image_emb [B, D], vit tokens [B, N, W], decoder context [B, Q, W_text])."""
    _, tokens = self.img(images, train=train)
    emb = self.img_proj(self.contrastive_pool(tokens)[:, 0])
    context = self.caption_pool_proj(self.caption_pool(tokens))
    return emb, tokens, context

  def embed_image(self, images, train=False):
    emb, tokens, _ = self.encode_image(images, train)
    return emb, tokens

  def embed_text(self, tokens, train=False):
    pooled, feats = self.txt(tokens, train=train)
    return self.txt_proj(pooled), feats

  def multimodal(self, feats, tokens, context, train=False):
    """Multimodal layers over unimodal text features -> next-token logits [B, L, V]."""
    x = self.decoder(feats, mask=text.padding_mask(tokens), context=context,
                     train=train)
    return self.vocab_proj(x)

  def decode(self, tokens, context, train=False):
    """Next-token logits [B, L, V] for `tokens` given the image `context`."""
    return self.multimodal(self.txt(tokens, train=train)[1], tokens, context, train)

  def __call__(self, batch, train: bool = False):
    out = dict(self.scale())
    context = None
    if "image" in batch:
      out["image_emb"], out["image_tokens"], context = self.encode_image(
          batch["image"], train)
    if "text" in batch:
      pooled, feats = self.txt(batch["text"], train=train)
      out["text_emb"], out["text_tokens"] = self.txt_proj(pooled), feats
      if context is not None:
        out["caption_logits"] = self.multimodal(feats, batch["text"], context, train)
    return out
