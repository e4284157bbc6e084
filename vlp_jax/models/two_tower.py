"""Two-tower image-text model (CLIP, SigLIP, LiT, FILIP): ViT + text transformer.

Batches with extra views ('views/NAME', 'text_views/NAME') also get their
embeddings, and every batch the projected local tokens (`view_outputs.py`).

Options of `config.model`: `token_embed_dim` > 0 adds FILIP's per-token projections
(outputs `image_token_emb`, `text_token_emb`, `text_token_mask`);
`text.prefix_conditioning` gives the text tower one learned prefix per data type,
chosen by `batch['data_type']` (0 caption, the default; 1 classification prompt).
"""
import flax.linen as nn
import ml_collections

from vlp_jax.models import (builders, heads, layers, macs, masked_outputs, text,
                             view_outputs, vit)
from vlp_jax.registry import MODELS

TOKEN_OUTPUTS = ("image_token_emb", "text_token_emb", "text_token_mask")


@MODELS.register("two_tower")
class TwoTower(nn.Module):
  """Outputs image_emb/text_emb (normalised), image_tokens/text_tokens, logit_scale(/bias)
  and, with `token_embed_dim`, FILIP's token embeddings (normalised per token):
  image_token_emb [B, N, d] of the patch tokens (no class token), text_token_emb
  [B, T, d] and text_token_mask [B, T] (float32, 1 = real token, BOS and EOS
  included; T = L, or min(L + P, context_length) with a prefix of P vectors)."""
  config: ml_collections.ConfigDict
  dtype: object

  # Outputs produced only under a setting: output -> the setting.
  OUTPUT_SWITCHES = dict({"logit_bias": "config.model.use_logit_bias=True"},
                         **{k: "config.model.token_embed_dim=256" for k in TOKEN_OUTPUTS},
                         **{k: masked_outputs.SWITCH for k in masked_outputs.OUTPUTS})
  # Settings of config.model this family implements (models.check_config).
  SUPPORTS = frozenset({"token_embed_dim", "text.prefix_conditioning", "proj_bias",
                        "masked_image_ratio", "image.token_reduction",
                        "image.proj", "text.proj"})

  @classmethod
  def outputs(cls, cfg):
    """Names of the outputs `__call__` returns for model config `cfg` (both inputs)."""
    out = {"image_emb", "text_emb", "image_tokens", "text_tokens", "logit_scale",
           *view_outputs.LOCAL_OUTPUTS}
    if cfg.use_logit_bias:
      out.add("logit_bias")
    if cfg.get("token_embed_dim", 0) > 0:
      out.update(TOKEN_OUTPUTS)
    return frozenset(out) | masked_outputs.output_names(cfg)

  @classmethod
  def view_outputs(cls, cfg, data_cfg):
    """The view outputs (`view_outputs.py`) for batches of `data_cfg`."""
    del cfg
    return view_outputs.view_output_names(data_cfg)

  @classmethod
  def forward_macs(cls, config, train=True):
    """Per-sample forward multiply-adds: image and text towers, the projections
    ('heads': pooled, and FILIP's per-token ones), one row of the similarity logits
    the objectives compute (`macs.logits_macs`); no decoder."""
    m = config.model
    n = macs.image_tokens(m, config.data.image_size, train)
    width = builders.tower_kwargs(m.image, None)["width"]
    head = (heads.projection_macs(m, "image", width)
            + heads.projection_macs(m, "text", m.text.width))
    if m.get("token_embed_dim", 0) > 0:
      head += macs.token_projection_macs(macs.vit_output_tokens(m.image, n), width,
                                         m.text.context_length, m.text.width,
                                         m.token_embed_dim)
    return {"image": macs.vit_macs(m.image, n), "text": macs.text_macs(m.text),
            "decoder": 0, "heads": head, "logits": macs.logits_macs(config, train)}

  @classmethod
  def tower_macs(cls, config, tower, train=True):
    """`embed_image` / `embed_text`: the tower and its pooled projection (FILIP's
    per-token projections are not part of them; `forward_macs` counts those)."""
    m = config.model
    if tower == "image":
      n = macs.image_tokens(m, config.data.image_size, train)
      width = builders.tower_kwargs(m.image, None)["width"]
      return macs.vit_macs(m.image, n) + heads.projection_macs(m, "image", width)
    if tower == "text":
      return macs.text_macs(m.text) + heads.projection_macs(m, "text", m.text.width)
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}.")

  def setup(self):
    cfg = self.config
    opts = layers.options_from_config(cfg)
    self.img = vit.ViT(**builders.tower_kwargs(cfg.image, self.dtype, opts))
    self.txt = text.TextTransformer(**builders.text_kwargs(cfg.text, self.dtype,
                                                           opts=opts, prefix=True))
    self.img_proj = heads.Projection(cfg.embed_dim, self.dtype,
                                     **heads.projection_kwargs(cfg, "image"))
    self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype,
                                     **heads.projection_kwargs(cfg, "text"))
    token_dim = cfg.get("token_embed_dim", 0)
    if token_dim > 0:
      self.img_token_proj = heads.TokenProjection(token_dim, self.dtype)
      self.txt_token_proj = heads.TokenProjection(token_dim, self.dtype)
    self.scale = heads.LogitScale(**builders.scale_kwargs(cfg))

  def embed_image(self, images, train=False):
    pooled, tokens = self.img(images, train=train)
    return self.img_proj(pooled), tokens

  def embed_text(self, tokens, train=False, data_type=None):
    """`data_type`: [B] int (prefix conditioning; None = the caption prefix, what
    zero-shot evaluation uses, as the paper does)."""
    pooled, feats = self.txt(tokens, train=train, data_type=data_type)
    return self.txt_proj(pooled), feats

  def embed_image_tokens(self, images, train=False):
    """-> (embedding [B, D], token embeddings [B, N, d]) (`interface.TokenEmbedder`)."""
    emb, tokens = self.embed_image(images, train)
    return emb, self.img_token_proj(tokens)

  def embed_text_tokens(self, tokens, train=False, data_type=None):
    """-> (embedding [B, D], token embeddings [B, T, d], mask [B, T] float32)."""
    emb, feats = self.embed_text(tokens, train, data_type)
    return emb, self.txt_token_proj(feats), self._text_mask(tokens)

  def _text_mask(self, tokens):
    cfg = self.config.text
    mask = text.sequence_mask(tokens, builders.prefix_length(cfg), cfg.context_length)
    return mask.astype("float32")

  def __call__(self, batch, train: bool = False):
    out = dict(self.scale())
    tokens_on = self.config.get("token_embed_dim", 0) > 0
    if "image" in batch:
      out["image_emb"], out["image_tokens"] = self.embed_image(batch["image"], train)
      if tokens_on:
        out["image_token_emb"] = self.img_token_proj(out["image_tokens"])
    if "text" in batch:
      out["text_emb"], out["text_tokens"] = self.embed_text(
          batch["text"], train, batch.get("data_type"))
      if tokens_on:
        out["text_token_emb"] = self.txt_token_proj(out["text_tokens"])
        out["text_token_mask"] = self._text_mask(batch["text"])
    out.update(view_outputs.local_embeddings(
        lambda t: self.img_proj(t, normalize=False),
        lambda t: self.txt_proj(t, normalize=False), out.get("image_tokens"),
        out.get("text_tokens"), self._text_mask(batch["text"]) if "text" in batch
        else None))
    masked_outputs.add_masked_outputs(
        out, self, batch.get("image"), lambda x, m: self.img(x, train, m)[1], train)
    return view_outputs.add_view_outputs(
        out, batch, self.embed_image,
        lambda t, train: self.embed_text(t, train, None),
        lambda t: self.img_proj(t, normalize=False), train)
