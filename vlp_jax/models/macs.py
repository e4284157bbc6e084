"""Analytic multiply-add counts of the shared building blocks, per sample.

Model families add these up in their `forward_macs` / `tower_macs` classmethods
(`interface.py`); `vlp_jax/perf/flops.py` turns the totals into FLOPs and MFU.
Convention (as open_clip's profile, PaLM's MFU and MaxText): matmuls only, attention
scores (QK^T) and values (AV) over the full (unmasked) sequence; norms, softmax and
elementwise ops are not counted. With token reduction (`token_reduction.py`) each
block's attention counts the tokens it sees and its MLP the tokens left after the
merge / selection; the matching, top-k and scatter work is not counted (no matmul
beyond ToMe's A x B cosine scores, a few % of one attention's QK^T).
"""
from vlp_jax.models import builders, token_reduction, vit


def attention_macs(lq: int, lk: int, width: int, kv_width: int = None) -> int:
  """Multiply-adds of one attention layer: q/k/v/out projections plus QK^T and AV."""
  kv_width = width if kv_width is None else kv_width
  proj = 2 * lq * width * width + 2 * lk * kv_width * width
  return proj + 2 * lq * lk * width


def block_macs(length: int, width: int, mlp_dim: int, context: int = 0,
               mlp_length: int = None) -> int:
  """Multiply-adds of one pre-LN block (self-attention, optional cross-attention, MLP);
  `mlp_length`: tokens the MLP sees when fewer than `length` (token reduction)."""
  mlp_length = length if mlp_length is None else mlp_length
  macs = attention_macs(length, length, width) + 2 * mlp_length * width * mlp_dim
  if context:
    macs += attention_macs(length, context, width)
  return macs


def pool_macs(num_queries: int, tokens: int, width: int, mlp_dim: int) -> int:
  """Multiply-adds of a MAP / attentional pooler (probes attend to the tokens + MLP)."""
  return attention_macs(num_queries, tokens, width) + 2 * num_queries * width * mlp_dim


def image_tokens(model_cfg, image_size: int, train: bool = True) -> int:
  """Patch tokens entering the image tower (after patch dropout when training);
  `vit_output_tokens` gives those it returns (fewer with token reduction)."""
  kw = builders.tower_kwargs(model_cfg.image, None)
  n = (image_size // kw["patch_size"]) ** 2
  p = model_cfg.image.get("patch_dropout", 0.0)
  return vit.num_kept_patches(n, p) if train and p > 0 else n


def vit_layer_tokens(image_cfg, tokens: int, pool: str = None):
  """Per encoder block of the `vit.ViT` built from `image_cfg` over `tokens` patch
  tokens: (tokens its attention sees, tokens its MLP sees), class token included;
  they shrink block by block with `image_cfg.token_reduction` on."""
  kw = builders.tower_kwargs(image_cfg, None)
  pool = image_cfg.pool if pool is None else pool
  return token_reduction.layer_counts(kw.get("token_reduction"), kw["depth"],
                                      tokens + (pool == "cls"), pool == "cls")


def vit_output_tokens(image_cfg, tokens: int, pool: str = None) -> int:
  """Patch tokens the ViT returns (its `tokens` output, class token excluded) for
  `tokens` entering: fewer than `tokens` with token reduction."""
  pool = image_cfg.pool if pool is None else pool
  counts = vit_layer_tokens(image_cfg, tokens, pool)
  return counts[-1][1] - (pool == "cls") if counts else tokens


def vit_macs(image_cfg, tokens: int, pool: str = None) -> int:
  """A `vit.ViT` built from `image_cfg` (`builders.tower_kwargs`) over `tokens` patch
  tokens: patch embedding, encoder (each block at its own token counts,
  `vit_layer_tokens`) and, for pool 'map', its pooling head over the tokens left.
  `pool` overrides `image_cfg.pool` (e.g. 'none' where the family pools itself)."""
  kw = builders.tower_kwargs(image_cfg, None)
  w, mlp, p = kw["width"], kw["mlp_dim"], kw["patch_size"]
  pool = image_cfg.pool if pool is None else pool
  counts = vit_layer_tokens(image_cfg, tokens, pool)
  macs = tokens * p * p * 3 * w + sum(block_macs(a, w, mlp, mlp_length=m)
                                      for a, m in counts)
  if pool == "map":
    macs += pool_macs(1, counts[-1][1] if counts else tokens, w, mlp)
  return macs


def text_macs(text_cfg) -> int:
  """A `text.TextTransformer` built from `text_cfg` over its full context length."""
  return text_cfg.depth * block_macs(text_cfg.context_length, text_cfg.width,
                                     text_cfg.mlp_dim)


def contrastive_logits_macs(config) -> int:
  """One row of the B x B image-text similarity matrix (B = config.batch_size)."""
  return config.batch_size * config.model.embed_dim


def token_projection_macs(num_image_tokens: int, image_width: int, text_length: int,
                          text_width: int, token_dim: int) -> int:
  """FILIP's per-token projections of one sample: every image and text token to
  `token_dim`."""
  return token_dim * (num_image_tokens * image_width + text_length * text_width)


def token_similarity_macs(config, train: bool = True) -> int:
  """One row of FILIP's token-wise similarity: the sample's N x L token products with
  every text of the global batch (B x N x L x d; s^I and s^T share them; the max and
  mean reductions are not matmuls). L: the text positions the tower sees, at most
  `context_length` (prefix conditioning inserts its vectors within it)."""
  m = config.model
  n = vit_output_tokens(m.image, image_tokens(m, config.data.image_size, train))
  return config.batch_size * n * m.text.context_length * m.token_embed_dim


def logits_macs(config, train: bool = True) -> int:
  """One sample's share of the similarity logits the selected objectives compute:
  the token-wise ones for 'filip' (with `model.token_embed_dim` > 0), the pooled
  B x B ones (`contrastive_logits_macs`) unless 'filip' is the only objective."""
  names = set(config.objectives.keys())
  filip = "filip" in names and config.model.get("token_embed_dim", 0) > 0
  total = token_similarity_macs(config, train) if filip else 0
  if names - {"filip"} or not filip:
    total += contrastive_logits_macs(config)
  return total
