"""Converts pretrained weights between other libraries' formats and vlp_jax.

    # open_clip / OpenAI / HF CLIP -> a vlp_jax checkpoint (for init_from or eval):
    python tools/convert_weights.py --from=open_clip --in=ViT-B-32.safetensors \\
        --to=vlp_jax --out=/tmp/b32
    # -> /tmp/b32/checkpoints/0 (params) and /tmp/b32/config.json; prints the
    #    config.model overrides that build the same model.
    # Between formats (no vlp_jax checkpoint in between):
    python tools/convert_weights.py --from=open_clip --in=x.safetensors \\
        --to=hf_clip --out=/tmp/hf_clip_dir
    # A trained vlp_jax run (its config.json and checkpoints/STEP) -> open_clip:
    python tools/convert_weights.py --from=vlp_jax --in=WORKDIR [--step=1000] \\
        --to=open_clip --out=model.safetensors
    # Only print the inferred config.model of a checkpoint:
    python tools/convert_weights.py --from=openai --in=ViT-B-16.pt --print_config

Formats: see vlp_jax/interop/ (`--from` / `--to` take their names, or 'vlp_jax').
--from=vlp_jax --to=hf_clip writes the run's tokenizer ids (config.data.tokenizer) in
config.json and refuses a tokenizer whose end-of-text id is not its highest (HF CLIP
would pool elsewhere); other sources are CLIP's tokenizer (end-of-text the highest id).
Nothing is downloaded: --in is a local file or directory.
"""
import json
import os
import warnings

import ml_collections
import numpy as np
from absl import app, flags

from vlp_jax import config as config_lib
from vlp_jax import errors, interop

_FROM = flags.DEFINE_string("from", None, "Source format: 'vlp_jax' or a weight format.")
_IN = flags.DEFINE_string("in", None, "Source file / directory (vlp_jax: a workdir).")
_TO = flags.DEFINE_string("to", "vlp_jax", "Target format: 'vlp_jax' or a weight format.")
_OUT = flags.DEFINE_string("out", None, "Target path (vlp_jax: a directory).")
_STEP = flags.DEFINE_integer("step", -1, "--from=vlp_jax: the step (-1 = latest).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0,
                                   "Image side to convert for (0 = the checkpoint's "
                                   "own); positions are resized (bicubic).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head width used to infer head counts.")
_IMAGE_HEADS = flags.DEFINE_integer("image_heads", 0, "Image heads (0 = inferred).")
_TEXT_HEADS = flags.DEFINE_integer("text_heads", 0, "Text heads (0 = inferred).")
_POOL_HEADS = flags.DEFINE_integer("pool_heads", 0, "open_clip_coca: the attentional "
                                   "pooler's heads (0 = open_clip's default, 8).")
_QUICK_GELU = flags.DEFINE_enum("quick_gelu", "auto", ["auto", "true", "false"],
                                "open_clip / openai: QuickGELU (auto = the format's "
                                "default: openai yes, open_clip no).")
_PRINT = flags.DEFINE_boolean("print_config", False,
                              "Print the inferred config.model overrides and stop.")


def overrides(model_cfg, image_size):
  """`--config.model.X=V` lines that build `model_cfg` (the architecture keys; no
  quotes, so that `$(... --print_config)` can be pasted onto a command line)."""
  lines = [f"--config.data.image_size={image_size}"]
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, f"{prefix}{k}.")
      else:
        flat[prefix + k] = v
  walk(model_cfg, "")
  keys = ["name", "embed_dim", "mlp_act", "layer_norm_eps", "use_logit_bias", "logit_scale_max",
          "proj_bias"] + [
      f"{t}.{k}" for t, ks in (
          ("image", ("variant", "width", "depth", "mlp_dim", "num_heads", "patch_size",
                     "pool", "ln_pre", "proj")),
          ("text", ("vocab_size", "width", "depth", "mlp_dim", "num_heads",
                    "context_length", "causal", "pool", "padding_mask", "proj")))
      for k in ks]
  if model_cfg.name == "coca":  # open_clip's CoCa (vlp_jax/interop/open_clip_coca.py).
    keys = keys[:1] + ["coca_layout", "decoder.depth", "decoder.num_queries",
                       "decoder.pool_heads"] + keys[1:]
  for k in keys:
    if k in flat:
      v = flat[k]
      lines.append(f"--config.model.{k}={v}")
  return lines


def _options(fmt):
  opts = {}
  if fmt in ("open_clip", "openai", "hf_clip", "open_clip_coca"):
    opts = dict(head_dim=_HEAD_DIM.value, image_heads=_IMAGE_HEADS.value,
                text_heads=_TEXT_HEADS.value)
  if fmt == "open_clip_coca":
    opts["pool_heads"] = _POOL_HEADS.value
  if fmt in ("open_clip", "openai", "open_clip_coca") and _QUICK_GELU.value != "auto":
    opts["quick_gelu"] = _QUICK_GELU.value == "true"
  return opts


def read_vlp_jax(workdir, step=-1):
  """(config, params as NumPy) of a vlp_jax run or of `write_vlp_jax`'s output."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise errors.DataPathError(f"{workdir} has no config.json: pass a vlp_jax workdir.")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(p) for p in os.listdir(root) if p.isdigit()) if os.path.isdir(root) \
      else []
  if not steps or (step >= 0 and step not in steps):
    raise errors.DataPathError(f"no checkpoint at step {step} in {root} (have {steps}).")
  step = steps[-1] if step < 0 else step
  item = "state" if os.path.isdir(os.path.join(root, str(step), "state")) else "params"
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(root, str(step), item))
  params = tree["params"] if item == "state" else tree
  return config, _to_numpy(params)


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def write_vlp_jax(out, params, model_cfg, image_size):
  """out/checkpoints/0 (a 'params' item: config.init_from.checkpoint or eval) and
  out/config.json (the default config with this model and image size)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  config.model = model_cfg
  config.data.image_size = image_size
  os.makedirs(out, exist_ok=True)
  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(out), "checkpoints"),
      item_handlers={"params": ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=True))
  manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
               force=True)
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config_lib.to_dict(config), f, indent=2, sort_keys=True)


def token_ids(spec: str, vocab_size: int):
  """{bos, eos, pad, vocab_size} of tokenizer `spec` (config.data.tokenizer), or None
  (with a warning) when it cannot be built here, e.g. its file is elsewhere."""
  from vlp_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  try:
    tok = tokenizers.get_tokenizer(spec)
  except (errors.UserError, OSError, ValueError, ImportError) as e:
    warnings.warn(f"cannot build the tokenizer {spec!r} ({e}); the exported config "
                  f"assumes CLIP's convention: end-of-text = the highest id "
                  f"{vocab_size - 1}, begin = {vocab_size - 2}, padding 0.")
    return None
  return dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, vocab_size=tok.vocab_size)


def convert(src, path, dst, out, step=-1, image_size=0, print_only=False, options=None):
  """Reads `path` in format `src`, writes `out` in format `dst`; returns the model
  config and image size (and prints the config.model overrides). hf_clip from a
  vlp_jax run: its config.json takes the run's tokenizer's ids (`token_ids`)."""
  export_options = {}
  if src == "vlp_jax":
    config, params = read_vlp_jax(path, step)
    model_cfg, size = config.model, image_size or config.data.image_size
    if image_size and image_size != config.data.image_size:
      raise errors.ConfigError("--image_size: a vlp_jax model is exported at its own "
                               f"image size {config.data.image_size}.")
    if dst == "hf_clip":
      export_options["token_ids"] = token_ids(config.data.tokenizer,
                                              model_cfg.text.vocab_size)
  else:
    model_cfg, params, size = interop.load(src, path, image_size=image_size,
                                           **(options or {}))
  print("\n".join(overrides(model_cfg, size)))
  if print_only:
    return model_cfg, size
  if not out:
    raise errors.ConfigError("--out is required (or --print_config).")
  if dst == "vlp_jax":
    write_vlp_jax(out, params, model_cfg, size)
  else:
    interop.save(dst, params, model_cfg, out, size, **export_options)
  print(f"wrote {dst} weights to {out}")
  return model_cfg, size


def main(argv):
  del argv
  if not _FROM.value or not _IN.value:
    raise app.UsageError("--from and --in are required (see --help).")
  try:
    convert(_FROM.value, _IN.value, _TO.value, _OUT.value, _STEP.value,
            _IMAGE_SIZE.value, _PRINT.value, _options(_FROM.value))
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
