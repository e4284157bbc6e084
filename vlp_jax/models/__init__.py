"""Models: towers and full image-text models, built from `config.model` by name."""
import jax.numpy as jnp

from vlp_jax.models import coca, two_tower
from vlp_jax.registry import MODELS

MODELS.register("two_tower")(two_tower.TwoTower)
MODELS.register("coca")(coca.CoCa)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(model_cfg):
  """Instantiates the registered model `model_cfg.name` with compute dtype `model_cfg.dtype`."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype '{model_cfg.dtype}' is not one of {sorted(DTYPES)}.")
  return MODELS.get(model_cfg.name)(config=model_cfg, dtype=DTYPES[model_cfg.dtype])
