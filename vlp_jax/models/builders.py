"""Constructor arguments of the shared building blocks (ViT, text transformer, logit
scale) from `config.model`, for any model family to use."""
import ml_collections

from vlp_jax.models import layers, token_reduction, vit


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
  if cfg.get("ln_pre", False):  # Only when on: the defaults' arguments stay as they were.
    kw["ln_pre"] = True
  reduction = token_reduction.from_config(cfg.get("token_reduction"))
  if reduction is not None:  # Likewise only when on.
    kw["token_reduction"] = reduction
  return dict(kw, pool=cfg.pool, dtype=dtype, dropout=cfg.get("dropout", 0.0),
              patch_dropout=cfg.get("patch_dropout", 0.0),
              opts=opts or layers.TransformerOptions())


def text_kwargs(cfg: ml_collections.ConfigDict, dtype, causal=None, pool=None,
                opts=None, prefix: bool = False):
  """Text-tower keyword arguments from `model.text` (`causal`/`pool` override it).

  `prefix=True` (a family that passes `data_type` to the tower) adds the prefix
  conditioning of `model.text.prefix_conditioning` / `prefix_length`."""
  extra = {} if cfg.get("padding_mask", True) else {"padding_mask": False}
  return dict(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth,
              mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads,
              context_length=cfg.context_length,
              causal=cfg.causal if causal is None else causal,
              pool=cfg.pool if pool is None else pool, dtype=dtype,
              dropout=cfg.get("dropout", 0.0),
              prefix_length=prefix_length(cfg) if prefix else 0,
              opts=opts or layers.TransformerOptions(), **extra)


def prefix_length(cfg: ml_collections.ConfigDict) -> int:
  """Learned prefix vectors per data type of `model.text` (0 = no prefix conditioning)."""
  return int(cfg.get("prefix_length", 1)) if cfg.get("prefix_conditioning") else 0


def scale_kwargs(cfg: ml_collections.ConfigDict):
  """`heads.LogitScale` keyword arguments from `config.model`."""
  return dict(scale_init=cfg.logit_scale_init, max_scale=cfg.logit_scale_max,
              bias_init=cfg.logit_bias_init, use_bias=cfg.use_logit_bias)
