"""What a model family provides: the contract between a model and the rest of vlp_jax.

A family is one flax module class in its own file, registered by name::

    @MODELS.register("my_model")
    class MyModel(nn.Module):
      config: ml_collections.ConfigDict   # config.model
      dtype: Any                          # compute dtype
      ...

`build_model(config.model)` instantiates `MODELS.get(config.model.name)(config=...,
dtype=...)` after `check_family` has checked the class against `ModelFamily` below
(a TypeError naming the family and everything it lacks). Who uses what:

- objectives' config checks: `outputs(cfg)` and `OUTPUT_SWITCHES`;
- the train step: `__call__(batch, train)` -> the outputs dict;
- evaluators (`train/predict.py`) and the tower benchmark: `embed_image`, `embed_text`;
- caption generation (`models/generate.py`), only if the family has both:
  `encode_image` and `decode` (`Captioner`);
- token-wise (FILIP) evaluation, only if the family has both `embed_image_tokens` and
  `embed_text_tokens` and the config turns them on (`TokenEmbedder`,
  `can_embed_tokens`);
- `models.check_config`: `SUPPORTS`, the optional settings the family implements;
- MFU and the benchmark's FLOPs (`perf/flops.py`): `forward_macs`, `tower_macs`
  (add up the primitives of `models/macs.py`). There is no generic fallback: a count
  the family does not give would make a wrong MFU.
"""
import dataclasses
import inspect
from typing import Any, Dict, FrozenSet, Protocol, Tuple

import flax.linen as nn

Array = Any


class ModelFamily(Protocol):
  """A registered model family (a flax `nn.Module` subclass)."""

  config: Any  # config.model
  dtype: Any  # compute dtype (parameters stay float32)

  # Optional: outputs produced only under a setting, output -> the setting to change
  # (e.g. {"logit_bias": "config.model.use_logit_bias=True"}); for config errors.
  OUTPUT_SWITCHES: Dict[str, str]

  # Optional: the optional `config.model` settings the family implements, by name
  # relative to config.model (see `OPTIONAL_SETTINGS`); a config that turns on one
  # the family lacks is a ConfigError, not a silently ignored switch.
  SUPPORTS: FrozenSet[str]

  @classmethod
  def outputs(cls, cfg) -> FrozenSet[str]:
    """Names of the outputs `__call__` returns for `config.model` = `cfg` when the
    batch has both 'image' and 'text'."""

  @classmethod
  def forward_macs(cls, config, train: bool = True) -> Dict[str, int]:
    """Multiply-adds of one sample's forward pass by part ({'image': ..., 'text':
    ...}, any keys; the parts sum to the whole step's model work) for the full
    `config`; `train` counts what training runs (e.g. after patch dropout)."""

  @classmethod
  def tower_macs(cls, config, tower: str, train: bool = True) -> int:
    """Multiply-adds of one sample through `embed_image` (tower 'image') or
    `embed_text` (tower 'text') alone, projection included."""

  def __call__(self, batch: Dict[str, Array], train: bool = False) -> Dict[str, Array]:
    """Outputs for a batch with 'image' [B, H, W, 3] and/or 'text' [B, L] int32."""

  def embed_image(self, images: Array, train: bool = False) -> Tuple[Array, Array]:
    """-> (embedding [B, D], image tokens [B, N, W])."""

  def embed_text(self, tokens: Array, train: bool = False) -> Tuple[Array, Array]:
    """-> (embedding [B, D], text features [B, L, W])."""


class Captioner(ModelFamily, Protocol):
  """A family that also generates captions (both methods, or neither)."""

  def encode_image(self, images: Array,
                   train: bool = False) -> Tuple[Array, Array, Array]:
    """-> (embedding [B, D], image tokens [B, N, W], decoder context [B, Q, C])."""

  def decode(self, tokens: Array, context: Array, train: bool = False,
             cache_index=None) -> Array:
    """Next-token logits [B, L, V]: `logits[:, t]` predicts `tokens[:, t + 1]`.
    With `cache_index` (decoding, `models/kv_decode.py`): `tokens` sit at positions
    cache_index.., earlier keys/values come from the 'cache' collection, and
    `context` is given on the first call only (`layers.Attention`'s KV cache)."""


class TokenEmbedder(ModelFamily, Protocol):
  """A family with per-token embeddings for token-wise (FILIP) scoring (both methods,
  or neither); evaluators use them when `can_embed_tokens(model)`."""

  def embed_image_tokens(self, images: Array,
                         train: bool = False) -> Tuple[Array, Array]:
    """-> (embedding [B, D], token embeddings [B, N, d], L2-normalised per token)."""

  def embed_text_tokens(self, tokens: Array, train: bool = False,
                        data_type: Array = None) -> Tuple[Array, Array, Array]:
    """-> (embedding [B, D], token embeddings [B, T, d], mask [B, T]: 1 = real)."""


# Optional settings of config.model -> (is it on for `cfg`, what to change).
OPTIONAL_SETTINGS = {
    "token_embed_dim": (lambda m: m.get("token_embed_dim", 0) > 0,
                        "config.model.token_embed_dim=0"),
    "text.prefix_conditioning": (lambda m: bool(m.text.get("prefix_conditioning")),
                                 "config.model.text.prefix_conditioning=False"),
    "proj_bias": (lambda m: bool(m.get("proj_bias")), "config.model.proj_bias=False"),
    "image.proj": (lambda m: not m.image.get("proj", True),
                   "config.model.image.proj=True"),
    "text.proj": (lambda m: not m.text.get("proj", True), "config.model.text.proj=True"),
    "masked_image_ratio": (lambda m: m.get("masked_image_ratio", 0.0) > 0,
                           "config.model.masked_image_ratio=0.0"),
    "image.token_reduction": (
        lambda m: (m.image.get("token_reduction") or {}).get("method", "none") != "none",
        "config.model.image.token_reduction.method='none'"),
}

# Attribute -> (what it is, whether it must be a classmethod / staticmethod).
REQUIRED = {
    "outputs": ("classmethod outputs(cfg) -> frozenset of output names", True),
    "forward_macs": ("classmethod forward_macs(config, train=True) -> dict of "
                     "per-sample forward multiply-adds by part", True),
    "tower_macs": ("classmethod tower_macs(config, tower, train=True) -> per-sample "
                   "multiply-adds of embed_image / embed_text", True),
    "embed_image": ("embed_image(images, train=False) -> (embedding, tokens)", False),
    "embed_text": ("embed_text(tokens, train=False) -> (embedding, features)", False),
}
GENERATION = ("encode_image", "decode")
TOKEN_METHODS = ("embed_image_tokens", "embed_text_tokens")
FIELDS = ("config", "dtype")


def _is_class_level(cls, attr: str) -> bool:
  return isinstance(inspect.getattr_static(cls, attr), (classmethod, staticmethod))


def problems(cls) -> list:
  """What `cls` lacks to be a model family (empty if nothing)."""
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    return [f"be a flax.linen.Module subclass (got {cls!r})"]
  out = []
  fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(
      cls) else set()
  lacking = [f for f in FIELDS if f not in fields]
  if lacking:
    out.append(f"the fields {', '.join(lacking)} (it is built as "
               f"cls(config=config.model, dtype=...))")
  for attr, (what, class_level) in REQUIRED.items():
    if not callable(getattr(cls, attr, None)):
      out.append(what)
    elif class_level and not _is_class_level(cls, attr):
      out.append(f"{attr} as a classmethod: {what} (it runs without building the "
                 "model)")
  switches = getattr(cls, "OUTPUT_SWITCHES", {})
  if not isinstance(switches, dict):
    out.append(f"OUTPUT_SWITCHES as a dict output -> setting (got {switches!r})")
  supports = getattr(cls, "SUPPORTS", frozenset())
  if not (isinstance(supports, (set, frozenset, tuple, list))
          and set(supports) <= set(OPTIONAL_SETTINGS)):
    out.append(f"SUPPORTS as a set of names from {sorted(OPTIONAL_SETTINGS)} (got "
               f"{supports!r})")
  for methods, what in ((GENERATION, "generation"), (TOKEN_METHODS, "token embeddings")):
    has = [callable(getattr(cls, a, None)) for a in methods]
    if any(has) and not all(has):
      out.append(f"both {' and '.join(methods)} for {what} (it has only "
                 f"{methods[has.index(True)]})")
  return out


def check_family(name: str, cls) -> None:
  """Raises a TypeError naming model family `name` and all it lacks, if anything."""
  missing = problems(cls)
  if missing:
    where = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
    raise TypeError(
        f"Model family '{name}' ({where}) does not follow vlp_jax/models/interface.py; "
        f"it needs: " + "; ".join(missing) + ".")


def can_generate(model) -> bool:
  """Whether `model` (a family class or instance) generates captions (`Captioner`)."""
  return all(callable(getattr(model, a, None)) for a in GENERATION)


def can_embed_tokens(model) -> bool:
  """Whether `model` (a built family instance) gives per-token embeddings under its
  config (`TokenEmbedder` and `config.token_embed_dim` > 0)."""
  config = getattr(model, "config", None)
  return (all(callable(getattr(model, a, None)) for a in TOKEN_METHODS)
          and config is not None and config.get("token_embed_dim", 0) > 0)


def unsupported_settings(cls, model_cfg) -> list:
  """(setting, how to turn it off) of the optional settings `model_cfg` turns on that
  family `cls` does not implement (its `SUPPORTS`)."""
  supports = set(getattr(cls, "SUPPORTS", ()))
  return [(name, off) for name, (is_on, off) in OPTIONAL_SETTINGS.items()
          if name not in supports and is_on(model_cfg)]
