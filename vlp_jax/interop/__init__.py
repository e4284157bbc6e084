"""Pretrained weights in and out: other libraries' checkpoints <-> vlp_jax parameters.

A format is an object (a module, or an instance) registered in `FORMATS` under its
name that provides:

  read(path) -> dict[str, np.ndarray]
      The checkpoint's flat arrays, named as the original library names them
      (`common.Arrays` when something came with them, e.g. HF's config.json, in
      `.meta`). Never downloads; a missing path raises `errors.DataPathError`; a
      file only torch can read, without torch, raises `errors.DataError` naming the
      `vlp_jax[torch]` extra.
  options_from_model(model_cfg) -> dict   (optional)
      `model_config` options that take what the arrays cannot tell (activation,
      head counts) from a run's config.model (config.init_from uses them).
  model_config(raw, base_model_cfg=None, **options) -> ml_collections.ConfigDict
      `config.model` for this checkpoint: sizes and architecture options inferred
      from the arrays (what arrays cannot tell, e.g. head counts, from `options` or
      the format's convention), on top of `base_model_cfg` (the recipe's; None =
      the defaults).
  native_image_size(raw) -> int
      The image side the checkpoint's position grid was trained for.
  to_params(raw, model_cfg, image_size) -> nested dict of np.float32 arrays
      The vlp_jax parameter tree, exactly the model's structure for `model_cfg`
      (its param layout too: `scan_layers`, `fused_qkv`), patch position embeddings
      resized to `image_size` if needed (`common.resize_grid`).
  from_params(params, model_cfg) -> dict[str, np.ndarray]
      The inverse (export), from any param layout.
  export_config(model_cfg, image_size, **export_options) -> dict   (optional)
      The original library's model config for the exported arrays.
  write(raw, path, export_config=None)
      Writes the arrays in the format's file type (safetensors), with the config.

Formats register themselves when their module is imported; `get(name)` imports every
module of this package first. Convenience: `load` (file -> model config and params)
and `save` (params -> file).
"""
import importlib
import pkgutil

from vlp_jax import errors

FORMATS = {}


def register(name):
  """`register('open_clip')(format_object)`: adds a format under `name`."""
  def add(fmt):
    if name in FORMATS and FORMATS[name] is not fmt:
      raise ValueError(f"weight format {name!r} registered twice")
    FORMATS[name] = fmt
    return fmt
  return add


# Format name -> the module of this package that registers it (a shortcut that
# avoids importing every module; tests/test_interop_export.py checks it lists every
# registered format, and that config.INIT_FROM_FORMATS equals `names()`).
MODULES = {"open_clip": "open_clip", "openai": "open_clip", "hf_clip": "hf_clip",
           "hf_siglip": "hf_siglip", "big_vision": "big_vision",
           "open_clip_coca": "open_clip_coca"}


def _import_all():
  for info in pkgutil.iter_modules(__path__):
    if info.name != "common":
      importlib.import_module(f"{__name__}.{info.name}")


def get(name: str):
  """The format registered as `name` (errors.ConfigKeyError naming the known ones)."""
  if name in MODULES:
    importlib.import_module(f"{__name__}.{MODULES[name]}")
  if name not in FORMATS:
    _import_all()
  if name not in FORMATS:
    raise errors.ConfigKeyError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}.")
  return FORMATS[name]


def names():
  """The names of all weight formats (every module of this package imported)."""
  _import_all()
  return sorted(FORMATS)


def load(fmt: str, path: str, base_model_cfg=None, image_size: int = 0,
         model_cfg=None, **options):
  """(model config, params, image size) of the checkpoint at `path` in format `fmt`.

  `model_cfg` given: that architecture is used as is (its layout options too);
  otherwise it is inferred (`model_config(raw, base_model_cfg, **options)`).
  `image_size` 0 = the checkpoint's own."""
  f = get(fmt)
  raw = f.read(path)
  if model_cfg is None:
    model_cfg = f.model_config(raw, base_model_cfg, **options)
  size = image_size or f.native_image_size(raw)
  return model_cfg, f.to_params(raw, model_cfg, size), size


def save(fmt: str, params, model_cfg, path: str, image_size: int,
         **export_options) -> dict:
  """Writes `params` of a vlp_jax model as format `fmt` at `path`; returns the arrays.
  `export_options` go to the format's `export_config` (hf_clip: `token_ids`)."""
  f = get(fmt)
  raw = f.from_params(params, model_cfg)
  export = getattr(f, "export_config", None)
  f.write(raw, path, export(model_cfg, image_size, **export_options) if export else None)
  return raw
