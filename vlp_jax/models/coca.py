"""CoCa: contrastive captioner (Yu et al., 2022), in two layouts (`model.coca_layout`).

'vlp_jax' (the default). Image: ViT tokens -> attention pooler with 1 query
(contrastive embedding) and one with `decoder.num_queries` queries, projected to the
text width (what the decoder cross-attends to). Text: unimodal causal layers (pooled
at EOS = text embedding) then `decoder.depth` multimodal layers (self-attention,
cross-attention, MLP) over the padding-masked text.

'open_clip' (open_clip's `CoCa`, for its checkpoints: vlp_jax/interop/open_clip_coca.py).
Image: a ViT with a class token (positions on it), `image.ln_pre`, no final LayerNorm;
one attentional pooler (`OpenClipPooler`: `decoder.num_queries` learned queries of
width `embed_dim`, LayerNorm on the queries and on the tokens, multi-head attention
with `decoder.pool_heads` heads, no MLP), then LayerNorm `ln_post`; query 0 projected
is the contrastive embedding, queries 1.. are the decoder's context. Text: a learned
class token appended after the tokens (position = the input length), causal
attention plus open_clip's key mask (`text.padding_mask`; key j is masked when token
j - 1 is padding, id 0: open_clip's released CoCa mask, shifted by one), the class
token's output after LayerNorm `ln_final` is pooled; the decoder reads the text
features before that LayerNorm. Decoder: per layer a causal self-attention block and
a cross-attention block, each with its own MLP, the image context LayerNorm'd per
layer (`ln_cross_kv`); no padding mask; LayerNorm, then a bias-free projection to the
vocabulary. Needs `embed_dim == text.width`.

Both: `caption_logits[:, t]` predicts `text[:, t + 1]`. The generic options
`mlp_act`, `layer_norm_eps`, `image.ln_pre` and `text.padding_mask` apply to both;
the 'open_clip' layout fixes the pools itself (`image.pool`, `text.pool` and
`text.causal` are not read) and its `text_tokens` output is the features the decoder
reads (before `ln_final`).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vlp_jax.models import (builders, heads, layers, macs, masked_outputs, text,
                             view_outputs, vit)
from vlp_jax.registry import MODELS

COCA_LAYOUTS = ("vlp_jax", "open_clip")


def open_clip_layout(m) -> bool:
  """Whether `config.model` `m` selects open_clip's CoCa layout."""
  return m.get("coca_layout", "vlp_jax") == "open_clip"


def pool_heads(m) -> int:
  """open_clip layout: the attentional pooler's heads (0 = the image tower's)."""
  heads = m.decoder.get("pool_heads", 0)
  return heads or builders.tower_kwargs(m.image, None)["num_heads"]


class OpenClipPooler(nn.Module):
  """open_clip's `AttentionalPooler`: `num_queries` learned queries of width `width`
  (LayerNorm `ln_q`) attend to the LayerNorm'd (`ln_k`) tokens; no residual, no MLP.
  Returns [B, num_queries, width]."""
  num_heads: int
  num_queries: int
  width: int
  dtype: object = jnp.float32
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, x):
    eps = self.opts.layer_norm_eps
    query = self.param("query", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), (None, "embed")),
                       (self.num_queries, self.width), jnp.float32)
    q = layers.layer_norm(self.dtype, "ln_q", eps)(query.astype(self.dtype))
    q = jnp.broadcast_to(q[None], (x.shape[0],) + q.shape)
    k = layers.layer_norm(self.dtype, "ln_k", eps)(x)
    return layers.Attention(self.num_heads, self.dtype, opts=self.opts, name="attn")(
        q, context=k)


def open_clip_text_mask(tokens):
  """[B, L] tokens -> [B, 1, 1, L + 1] key mask of open_clip's CoCa text tower (class
  token appended): key 0 is always seen, key j > 0 iff token j - 1 is not padding."""
  valid = tokens != text.PAD_ID
  first = jnp.ones((tokens.shape[0], 1), bool)
  return jnp.concatenate([first, valid], axis=1)[:, None, None, :]


class OpenClipText(nn.Module):
  """open_clip's CoCa text tower (`embed_cls`): tokens, then a learned class token,
  with positions 0..L; causal pre-LN blocks (no final LayerNorm inside). Returns
  (pooled = LayerNorm(class token output) [B, W], token features [B, L, W])."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  context_length: int
  dtype: object = jnp.float32
  dropout: float = 0.0
  padding_mask: bool = True
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, tokens, train: bool = False, cache_index=None):
    """`cache_index` (not None): decoding with a KV cache; no class token (under
    causal attention it changes no text position) -> (None, token features)."""
    b, length = tokens.shape
    text.check_length(length, self.context_length)
    embed = text.token_embedding(self.vocab_size, self.width, self.dtype)
    cls = self.param("cls", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), (None, None, "embed")),
                     (1, 1, self.width), jnp.float32)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), (None, "length", "embed")),
                     (1, self.context_length + 1, self.width), jnp.float32)
    if cache_index is not None:
      x = embed(tokens) + text.positions(pos, length, cache_index).astype(self.dtype)
      x = layers.constrain(x, ("batch", "length", "embed"))
      return None, layers.Transformer(
          self.depth, self.num_heads, self.mlp_dim, self.dtype, causal=True,
          final_norm=False, opts=self.opts, name="encoder")(x, cache_index=cache_index)
    x = jnp.concatenate([embed(tokens), jnp.broadcast_to(
        cls.astype(self.dtype), (b, 1, self.width))], axis=1)
    x = x + pos[:, :length + 1].astype(self.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = open_clip_text_mask(tokens) if self.padding_mask else None
    x = layers.Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype,
                           causal=True, dropout=self.dropout, final_norm=False,
                           opts=self.opts, name="encoder")(x, mask=mask, train=train)
    pooled = layers.layer_norm(self.dtype, "ln_final", self.opts.layer_norm_eps)(x[:, -1])
    return pooled, x[:, :-1]


class MultimodalLayer(nn.Module):
  """One open_clip multimodal layer: a causal self-attention block (ln_attn, attn,
  ln_mlp, mlp) then a cross-attention block (ln_cross on the text, ln_cross_kv on the
  image context, cross_attn, ln_cross_mlp, cross_mlp). Param names are flat, so the
  self-attention follows `layers.Block`'s (fused_qkv, checkpoint conversions)."""
  num_heads: int
  mlp_dim: int
  dtype: object = jnp.float32
  dropout: float = 0.0
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, x, context, train=False, cache_index=None):
    """`cache_index` (not None): decoding with a KV cache (`layers.Attention`); the
    context is needed on the first call only."""
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=not train)
    eps, act = self.opts.layer_norm_eps, self.opts.mlp_act
    ln = lambda name: layers.layer_norm(self.dtype, name, eps)
    mlp = lambda name: layers.Mlp(self.mlp_dim, self.dtype, self.dropout, act, name=name)
    out = lambda y: layers.constrain(y, ("batch", "length", "embed"))
    h = layers.Attention(self.num_heads, self.dtype, causal=True, opts=self.opts,
                         name="attn")(ln("ln_attn")(x), cache_index=cache_index)
    x = out(x + drop(h))
    x = out(x + drop(mlp("mlp")(ln("ln_mlp")(x), train=train)))
    if context is None and cache_index is None:  # A text-only pass (`text_lm_logits`).
      return x
    q = ln("ln_cross")(x)  # Before ln_cross_kv: the training program's op order.
    kv = None if context is None else ln("ln_cross_kv")(context)
    h = layers.Attention(self.num_heads, self.dtype, opts=self.opts, name="cross_attn")(
        q, context=kv, cache_index=cache_index)
    x = out(x + drop(h))
    return out(x + drop(mlp("cross_mlp")(ln("ln_cross_mlp")(x), train=train)))


class _ScanMultimodalLayer(nn.Module):
  """A `MultimodalLayer` named 'block' as an `nn.scan` body (as layers.Transformer)."""
  num_heads: int
  mlp_dim: int
  dtype: object = jnp.float32
  dropout: float = 0.0
  opts: layers.TransformerOptions = layers.TransformerOptions()
  train: bool = False

  @nn.compact
  def __call__(self, x, context, cache_index):
    return MultimodalLayer(self.num_heads, self.mlp_dim, self.dtype, self.dropout,
                           self.opts, name="block")(x, context, self.train,
                                                    cache_index), None


class MultimodalDecoder(nn.Module):
  """open_clip's `MultimodalTransformer` without its vocabulary projection: `depth`
  `MultimodalLayer`s (`block_i`, or stacked `layers/block` with `opts.scan_layers`)
  and a final LayerNorm."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: object = jnp.float32
  dropout: float = 0.0
  opts: layers.TransformerOptions = layers.TransformerOptions()

  @nn.compact
  def __call__(self, x, context, train=False, cache_index=None):
    policy = layers.REMAT_POLICIES[self.opts.remat]
    remat = self.opts.remat != "none" and cache_index is None
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
              dropout=self.dropout, opts=self.opts)
    if self.opts.scan_layers:
      layer = nn.remat(_ScanMultimodalLayer, policy=policy, prevent_cse=False) \
          if remat else _ScanMultimodalLayer
      stack = nn.scan(layer, variable_axes=layers.SCAN_VARIABLE_AXES,
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**kw, train=train, name="layers")(x, context, cache_index)
    else:
      # static_argnums counts `self` as 0: `train` is argument 3.
      cls = nn.remat(MultimodalLayer, policy=policy, static_argnums=(3,)) \
          if remat else MultimodalLayer
      for i in range(self.depth):
        x = cls(**kw, name=f"block_{i}")(x, context, train, cache_index)
    return layers.layer_norm(self.dtype, "ln_final", self.opts.layer_norm_eps)(x)


@MODELS.register("coca")
class CoCa(nn.Module):
  """Outputs image_emb, text_emb, image_tokens, text_tokens, caption_logits,
  text_lm_logits (the decoder without the image), logit_scale."""
  config: ml_collections.ConfigDict
  dtype: object

  # Outputs produced only under a setting: output -> the setting.
  OUTPUT_SWITCHES = dict({"logit_bias": "config.model.use_logit_bias=True"},
                         **{k: masked_outputs.SWITCH for k in masked_outputs.OUTPUTS})
  # Settings of config.model this family implements (models.check_config).
  SUPPORTS = frozenset({"masked_image_ratio", "image.token_reduction"})

  @classmethod
  def outputs(cls, cfg):
    """Names of the outputs `__call__` returns for model config `cfg` (both inputs)."""
    out = {"image_emb", "text_emb", "image_tokens", "text_tokens", "caption_logits",
           "text_lm_logits", "logit_scale", *view_outputs.LOCAL_OUTPUTS}
    if open_clip_layout(cfg):
      out.discard("image_local_emb")
    return frozenset(out | ({"logit_bias"} if cfg.use_logit_bias else set())
                     | masked_outputs.output_names(cfg))

  @classmethod
  def view_outputs(cls, cfg, data_cfg):
    """The view outputs (`view_outputs.py`) for batches of `data_cfg`."""
    return view_outputs.view_output_names(data_cfg, local=not open_clip_layout(cfg))

  @classmethod
  def _image_macs(cls, config, train):
    """(contrastive path, caption-only path) multiply-adds per sample. 'vlp_jax':
    (ViT + 1-query pooler, Q-query pooler + projection to the text width);
    'open_clip': (ViT with class token + the one pooler of all Q queries, 0)."""
    m = config.model
    kw = builders.tower_kwargs(m.image, None)
    w, mlp, q = kw["width"], kw["mlp_dim"], m.decoder.num_queries
    n = macs.image_tokens(m, config.data.image_size, train)
    if open_clip_layout(m):  # (Token reduction: the poolers see the tokens left.)
      out = macs.vit_output_tokens(m.image, n, pool="cls")
      return (macs.vit_macs(m.image, n, pool="cls")
              + macs.attention_macs(q, out + 1, m.embed_dim, kv_width=w)), 0
    out = macs.vit_output_tokens(m.image, n, pool="none")
    contrastive = macs.vit_macs(m.image, n, pool="none") + macs.pool_macs(1, out, w, mlp)
    return contrastive, macs.pool_macs(q, out, w, mlp) + q * w * m.text.width

  @classmethod
  def _text_macs(cls, m):
    t = m.text
    if open_clip_layout(m):  # The class token is one more position.
      return t.depth * macs.block_macs(t.context_length + 1, t.width, t.mlp_dim)
    return macs.text_macs(t)

  @classmethod
  def _pooled_width(cls, m):
    """Width of the pooled image features the contrastive projection reads."""
    return m.embed_dim if open_clip_layout(m) else builders.tower_kwargs(
        m.image, None)["width"]

  @classmethod
  def forward_macs(cls, config, train=True):
    """Per-sample forward multiply-adds: image (ViT and the poolers), unimodal text,
    decoder (multimodal layers and vocabulary projection), the two projections
    ('heads'), one row of the contrastive logits."""
    m = config.model
    t = m.text
    contrastive, caption = cls._image_macs(config, train)
    length = t.context_length
    if open_clip_layout(m):  # Self-attention block, then cross-attention block + MLP.
      layer = (macs.block_macs(length, t.width, t.mlp_dim)
               + macs.attention_macs(length, m.decoder.num_queries - 1, t.width)
               + 2 * length * t.width * t.mlp_dim)
    else:
      layer = macs.block_macs(length, t.width, t.mlp_dim, context=m.decoder.num_queries)
    decoder = m.decoder.depth * layer + length * t.width * t.vocab_size
    return {"image": contrastive + caption, "text": cls._text_macs(m),
            "decoder": decoder, "heads": (cls._pooled_width(m) + t.width) * m.embed_dim,
            "logits": macs.contrastive_logits_macs(config)}

  @classmethod
  def tower_macs(cls, config, tower, train=True):
    """`embed_image` (without the 'vlp_jax' caption pooler, which feeds only the
    decoder) / `embed_text`, each with its projection."""
    m = config.model
    if tower == "image":
      return cls._image_macs(config, train)[0] + cls._pooled_width(m) * m.embed_dim
    if tower == "text":
      return cls._text_macs(m) + m.text.width * m.embed_dim
    raise ValueError(f"tower must be 'image' or 'text', got {tower!r}.")

  def setup(self):
    cfg = self.config
    layout = cfg.get("coca_layout", "vlp_jax")
    if layout not in COCA_LAYOUTS:
      raise ValueError(f"model.coca_layout {layout!r} is not one of {COCA_LAYOUTS}.")
    opts = layers.options_from_config(cfg)
    img_kw = builders.tower_kwargs(cfg.image, self.dtype, opts)
    self.img_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.txt_proj = heads.Projection(cfg.embed_dim, self.dtype)
    self.scale = heads.LogitScale(**builders.scale_kwargs(cfg))
    if layout == "open_clip":
      self._setup_open_clip(cfg, img_kw, opts)
      return
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

  def _setup_open_clip(self, cfg, img_kw, opts):
    if cfg.embed_dim != cfg.text.width or cfg.decoder.num_queries < 2:
      raise ValueError("model.coca_layout='open_clip' needs embed_dim == text.width "
                       f"(got {cfg.embed_dim}, {cfg.text.width}) and "
                       f"decoder.num_queries >= 2 (got {cfg.decoder.num_queries}).")
    img_kw.update(pool="cls", final_norm=False)
    self.img = vit.ViT(**img_kw)
    self.attn_pool = OpenClipPooler(pool_heads(cfg), cfg.decoder.num_queries,
                                    cfg.embed_dim, self.dtype, opts=opts)
    self.ln_post = layers.layer_norm(self.dtype, eps=opts.layer_norm_eps)
    t = cfg.text
    dropout = t.get("dropout", 0.0)
    self.txt = OpenClipText(t.vocab_size, t.width, t.depth, t.mlp_dim, t.num_heads,
                            t.context_length, self.dtype, dropout,
                            t.get("padding_mask", True), opts)
    self.decoder = MultimodalDecoder(cfg.decoder.depth, t.num_heads, t.mlp_dim,
                                     self.dtype, dropout, opts)
    self.vocab_proj = layers.dense(t.vocab_size, ("embed", "vocab"), self.dtype,
                                   use_bias=False)

  def encode_image(self, images, train=False):
    """-> (image_emb [B, D], vit tokens [B, N, W], decoder context [B, Q, W_text])."""
    if open_clip_layout(self.config):
      cls_out, tokens = self.img(images, train=train)
      pooled = self.ln_post(self.attn_pool(
          jnp.concatenate([cls_out[:, None], tokens], axis=1)))
      return self.img_proj(pooled[:, 0]), tokens, pooled[:, 1:]
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

  def multimodal(self, feats, tokens, context, train=False, cache_index=None):
    """Multimodal layers over unimodal text features -> next-token logits [B, L, V]."""
    if open_clip_layout(self.config):  # open_clip's decoder has no padding mask.
      return self.vocab_proj(self.decoder(feats, context, train=train,
                                          cache_index=cache_index))
    mask = text.padding_mask(tokens) if cache_index is None else None
    x = self.decoder(feats, mask=mask, context=context, train=train,
                     cache_index=cache_index)
    return self.vocab_proj(x)

  def decode(self, tokens, context, train=False, cache_index=None):
    """Next-token logits [B, L, V] for `tokens` given the image `context`.

    With `cache_index` (an int32 scalar; `models/kv_decode.py` drives it) `tokens`
    are those at positions `cache_index`.. of the caption and the keys/values of the
    earlier ones come from the 'cache' collection (apply with mutable=['cache']);
    `context` is needed on the first call only (None afterwards: its cross-attention
    keys/values are cached)."""
    feats = self.txt(tokens, train=train, cache_index=cache_index)[1]
    return self.multimodal(feats, tokens, context, train, cache_index)

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
      # The same decoder without the image (cross-attention skipped): a text-only
      # language model (PRIOR's reference model). XLA drops it unless something reads it.
      out["text_lm_logits"] = self.multimodal(feats, batch["text"], None, train)
    # open_clip's layout projects the pooler's output (width embed_dim), so its patch
    # tokens have no linear map to the embedding space: no image locals there.
    project_image = (None if open_clip_layout(self.config)
                     else lambda t: self.img_proj(t, normalize=False))
    out.update(view_outputs.local_embeddings(
        project_image,
        lambda t: self.txt_proj(t, normalize=False), out.get("image_tokens"),
        out.get("text_tokens"), text.sequence_mask(batch["text"]) if "text" in batch
        else None))
    masked_outputs.add_masked_outputs(
        out, self, batch.get("image"), lambda x, m: self.img(x, train, m)[1], train)
    return view_outputs.add_view_outputs(out, batch, self.embed_image, self.embed_text,
                                         project_image, train)
