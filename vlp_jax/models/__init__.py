"""Models: towers and full image-text models, built from `config.model` by name.

Each model family is one module registering its class with `@MODELS.register(name)`
and following `interface.py`; importing this package registers the built-in ones.
"""
import jax.numpy as jnp

from vlp_jax import errors
from vlp_jax.models import coca  # pylint: disable=unused-import  (registers 'coca')
from vlp_jax.models import interface
from vlp_jax.models import builders
from vlp_jax.models import layers
from vlp_jax.models import m3ae  # pylint: disable=unused-import  (registers 'm3ae')
from vlp_jax.models import token_reduction
from vlp_jax.models import two_tower  # pylint: disable=unused-import  (registers)
from vlp_jax.registry import MODELS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def family(name: str):
  """The class registered as model `name`, checked against `interface.ModelFamily`
  (a TypeError naming the family and what it lacks)."""
  cls = MODELS.get(name)
  interface.check_family(name, cls)
  return cls


def compute_dtype(model_cfg):
  """The jnp dtype named by `model_cfg.dtype` (a ConfigError if it is unknown)."""
  if model_cfg.dtype not in DTYPES:
    raise errors.ConfigError(f"config.model.dtype='{model_cfg.dtype}' is not one of "
                             f"{sorted(DTYPES)}.")
  return DTYPES[model_cfg.dtype]


def build_model(model_cfg):
  """Instantiates the registered model `model_cfg.name` with compute dtype `model_cfg.dtype`."""
  return family(model_cfg.name)(config=model_cfg, dtype=compute_dtype(model_cfg))


def output_names(model_cfg) -> frozenset:
  """The outputs the model `model_cfg.name` produces under `model_cfg`."""
  return family(model_cfg.name).outputs(model_cfg)


def produced_outputs(config) -> frozenset:
  """Every output the model of `config` returns for its training batches: the
  family's outputs plus, for families that embed extra views (a classmethod
  `view_outputs(model_cfg, data_cfg)`), those of `config.data.views` / `text_views`."""
  fam = family(config.model.name)
  views = getattr(fam, "view_outputs", None)
  extra = views(config.model, config.get("data")) if views else frozenset()
  return fam.outputs(config.model) | extra


def output_switch(name: str, output: str) -> str:
  """The setting under which model `name` produces `output` ('' if none)."""
  return getattr(MODELS.get(name), "OUTPUT_SWITCHES", {}).get(output, "")


def producers(output: str, model_cfg) -> list:
  """Names of the registered models that produce `output` (under `model_cfg`'s other
  settings); families that do not follow the interface are left out."""
  return [n for n in MODELS.names() if not interface.problems(MODELS.get(n))
          and output in MODELS.get(n).outputs(model_cfg)]


def forward_macs(config, train: bool = True) -> dict:
  """Per-sample forward multiply-adds by part of the model `config.model.name`."""
  return family(config.model.name).forward_macs(config, train)


def tower_macs(config, tower: str, train: bool = True) -> int:
  """Per-sample multiply-adds of one tower (`embed_image` / `embed_text`) alone."""
  return family(config.model.name).tower_macs(config, tower, train)


def check_config(model_cfg) -> None:
  """The model family is registered, follows the interface, and its implementation
  switches are known."""
  cls = family(model_cfg.name)
  compute_dtype(model_cfg)
  for setting, off in interface.unsupported_settings(cls, model_cfg):
    can = [n for n in MODELS.names() if setting in getattr(MODELS.get(n), "SUPPORTS", ())]
    raise errors.ConfigError(
        f"config.model.{setting} is set, but model '{model_cfg.name}' does not "
        f"implement it (models that do: {can}); set {off} or change "
        "config.model.name.")
  if model_cfg.remat not in layers.REMAT_POLICIES:
    raise errors.ConfigError(f"config.model.remat='{model_cfg.remat}' is not one of "
                             f"{sorted(layers.REMAT_POLICIES)}.")
  if model_cfg.attention_impl not in layers.ATTENTION_IMPLS:
    raise errors.ConfigError(
        f"config.model.attention_impl='{model_cfg.attention_impl}' is not one of "
        f"{layers.ATTENTION_IMPLS}.")
  if token_reduction.from_config(model_cfg.image.get("token_reduction")) is not None:
    depth = builders.tower_kwargs(model_cfg.image, None)["depth"]
    token_reduction.check_config(model_cfg, depth)
