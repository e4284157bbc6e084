"""Models: towers and full image-text models, built from `config.model` by name."""
import jax.numpy as jnp

from vlp_jax import errors
from vlp_jax.models import coca, layers, two_tower
from vlp_jax.registry import MODELS

MODELS.register("two_tower")(two_tower.TwoTower)
MODELS.register("coca")(coca.CoCa)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(model_cfg):
  """Instantiates the registered model `model_cfg.name` with compute dtype `model_cfg.dtype`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype '{model_cfg.dtype}' is not one of {sorted(DTYPES)}.")
  return MODELS.get(model_cfg.name)(config=model_cfg, dtype=DTYPES[model_cfg.dtype])


def output_names(model_cfg) -> frozenset:
  """The outputs the model `model_cfg.name` produces under `model_cfg`."""
  return MODELS.get(model_cfg.name).outputs(model_cfg)


def output_switch(name: str, output: str) -> str:
  """The setting under which model `name` produces `output` ('' if none)."""
  return getattr(MODELS.get(name), "OUTPUT_SWITCHES", {}).get(output, "")


def producers(output: str, model_cfg) -> list:
  """Names of the registered models that produce `output` (under `model_cfg`'s other
  settings)."""
  return [n for n in MODELS.names() if output in MODELS.get(n).outputs(model_cfg)]


def check_config(model_cfg) -> None:
  """The model family is registered and its implementation switches are known."""
  MODELS.get(model_cfg.name)
  if model_cfg.dtype not in DTYPES:
    raise errors.ConfigError(f"config.model.dtype='{model_cfg.dtype}' is not one of "
                             f"{sorted(DTYPES)}.")
  if model_cfg.remat not in layers.REMAT_POLICIES:
    raise errors.ConfigError(f"config.model.remat='{model_cfg.remat}' is not one of "
                             f"{sorted(layers.REMAT_POLICIES)}.")
  if model_cfg.attention_impl not in layers.ATTENTION_IMPLS:
    raise errors.ConfigError(
        f"config.model.attention_impl='{model_cfg.attention_impl}' is not one of "
        f"{layers.ATTENTION_IMPLS}.")
