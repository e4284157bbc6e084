"""Captions images with a trained captioning run (CoCa) and writes JSONL.

    .venv/bin/python tools/caption.py --workdir=runs/coca --images=photos/ \
        --out=captions.jsonl [--method=beam --beam_size=4 --length_penalty=0.6]
    .venv/bin/python tools/caption.py --workdir=runs/coca \
        --images=jsonl:data/val.jsonl --out=val_captions.jsonl --method=sample \
        --top_p=0.9 --temperature=0.8 --seed=1

--images is a folder (every .jpg/.jpeg/.png/.webp/.bmp/.gif file under it, sorted,
sub-folders included) or `jsonl:FILE` with one {"image": path, ...} object per line
(paths relative to the file's folder; other keys are ignored, so the training
`jsonl:` files work). The run's config.json and newest good checkpoint (or --step)
are loaded as `main.py --mode=eval` does. Each output line is
{"image": path, "caption": text}, in input order: the path as listed (folders) or
the jsonl line's own "image" value (to join on). An unreadable image is skipped
with a warning (listed at the end) unless --on_bad=fail, which stops with an error
naming it. Decoding: models/generate.py (KV-cached greedy, beam search with GNMT's
length penalty ((5 + n) / 6) ** length_penalty, nucleus sampling; option defaults and
ranges: vlp_jax/decode_options.py). --beam_size=1 equals greedy decoding only with
--length_penalty=0. Sharding follows the run's mesh and config.sharding_rules.
"""
import json
import os
import sys
from typing import List, Tuple

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli, decode_options, errors  # pylint: disable=g-import-not-at-top

# Script: absl's FLAGS; imported (tests): private flags (no clash between tools).
_FLAG_VALUES, _define = cli.tool_flags(__name__)

_D = decode_options.DEFAULTS

_WORKDIR = _define(flags.DEFINE_string)("workdir", None, "A trained CoCa run (config.json + "
                               "checkpoints/).")
_IMAGES = _define(flags.DEFINE_string)("images", None, "A folder of images, or jsonl:FILE.")
_OUT = _define(flags.DEFINE_string)("out", None, "Output JSONL file.")
_STEP = _define(flags.DEFINE_integer)("step", -1, "Checkpoint step (-1: the newest good one).")
_METHOD = _define(flags.DEFINE_enum)("method", _D["method"], list(decode_options.METHODS),
                            "Decoding method.")
_BEAM = _define(flags.DEFINE_integer)("beam_size", _D["beam_size"], "--method=beam: hypotheses "
                             "per image (1 = greedy only with --length_penalty=0).")
_ALPHA = _define(flags.DEFINE_float)("length_penalty", _D["length_penalty"], "--method=beam: "
                            "GNMT alpha in [0, 10] (0 = rank by log-probability; "
                            "larger = longer captions).")
_TOP_P = _define(flags.DEFINE_float)("top_p", _D["top_p"], "--method=sample: nucleus mass in "
                            "(0, 1].")
_TEMP = _define(flags.DEFINE_float)("temperature", _D["temperature"], "--method=sample: logits "
                           f"divided by it (>= {decode_options.MIN_TEMPERATURE}).")
_MAX_LEN = _define(flags.DEFINE_integer)("max_len", _D["max_len"], "Tokens per caption incl. "
                                "BOS (0: the model's text context length).")
_BATCH = _define(flags.DEFINE_integer)("batch_size", 32, "Images per decoding batch.")
_SEED = _define(flags.DEFINE_integer)("seed", _D["seed"], "--method=sample: PRNG seed in "
                             f"[0, {decode_options.SEED_LIMIT - 1}] (batch i uses "
                             "seed + i, modulo 2**31).")
_ON_BAD = _define(flags.DEFINE_enum)("on_bad", "skip", ["skip", "fail"], "An unreadable image: "
                            "skip it with a warning, or stop with an error.")
flags.mark_flags_as_required(["workdir", "images", "out"], flag_values=_FLAG_VALUES)


def list_images(spec: str) -> List[Tuple[str, str]]:
  """(name, path) of each image of a folder or of a `jsonl:FILE` (module docstring),
  in order: the name is the path (folders) or the line's "image" value (jsonl)."""
  from vlp_jax.data import sources_files  # pylint: disable=g-import-not-at-top
  if spec.startswith("jsonl:"):
    path = spec[len("jsonl:"):]
    if not os.path.isfile(path):
      raise errors.DataPathError(f"--images={spec}: no such file '{path}'. Pass "
                                 "jsonl:FILE with one {\"image\": path} object a line.")
    root, out = os.path.dirname(os.path.abspath(path)), []
    try:
      with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            name = json.loads(line)["image"]
            out.append((name, os.path.join(root, name)))
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise errors.DataError(f"{path}:{line_no}: expected a JSON object with "
                                   f"an 'image' string key ({e!r}).") from e
    except UnicodeDecodeError as e:
      raise errors.DataError(f"{path}: not UTF-8 text ({e}); JSONL files must be "
                             "UTF-8 encoded.") from e
  elif os.path.isdir(spec):
    out = [(p, p) for p in sorted(
        os.path.join(d, n) for d, _, names in os.walk(spec) for n in names
        if n.lower().endswith(sources_files.IMAGE_EXTENSIONS))]
  else:
    raise errors.DataPathError(f"--images={spec!r} is neither a folder nor jsonl:FILE.")
  if not out:
    raise errors.DataError(f"--images={spec} lists no images (folders: files ending in "
                           f"{', '.join(sources_files.IMAGE_EXTENSIONS)}).")
  return out


def load_run(workdir: str, step=None):
  """(Experiment, params, where from) of a trained captioning run."""
  from vlp_jax.train import saved_config  # pylint: disable=g-import-not-at-top
  config = saved_config.load(workdir)
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  if "caption_logits" not in models.output_names(config.model):
    raise errors.ConfigError(
        f"The model of '{workdir}' ('{config.model.name}') has no text decoder: "
        "captions need a captioning model (model.name='coca').")
  exp, params, _, where = saved_config.load_experiment(config, workdir, step)
  return exp, params, where


def read_images(paths, image_size: int, normalization: str, on_bad: str):
  """(images [N, S, S, 3] float32 of the readable paths, their indices in `paths`, the
  skipped (index, reason) pairs). `on_bad='fail'` raises DataError at the first."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import decode, transforms  # pylint: disable=g-import-not-at-top
  images, kept, bad = [], [], []
  for i, path in enumerate(paths):
    try:
      image = transforms.resize_center_crop(decode.load_image(path), image_size)
    except (decode.BadRecord, OSError) as e:
      if on_bad == "fail":
        raise errors.DataError(f"Cannot read image '{path}' ({e}); fix or remove it, "
                               "or pass --on_bad=skip.") from e
      logging.warning("Skipping unreadable image '%s' (%s).", path, e)
      bad.append((i, str(e)))
      continue
    images.append(transforms.normalize(image, normalization))
    kept.append(i)
  return np.stack(images) if images else None, kept, bad


def caption_images(exp, params, images, batch_size: int, on_bad: str = "skip",
                   seed: int = 0, **options):
  """[(name, caption)] of the readable `images` ((name, path) pairs, `list_images`;
  read a batch at a time), and the skipped (name, reason) pairs. `options`:
  `predict.generate_fn`'s. Runs under the run's mesh and logical-axis rules."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  fns, d = exp.predict_fns, exp.config.data
  out, skipped = [], []
  mesh, rules = exp.contexts()
  with mesh, rules:
    for i, start in enumerate(range(0, len(images), batch_size)):
      names, paths = zip(*images[start:start + batch_size])
      pixels, kept, bad = read_images(paths, d.image_size, d.normalization, on_bad)
      skipped += [(names[j], reason) for j, reason in bad]
      if pixels is None:
        continue
      n = len(kept)
      if n < batch_size:  # One compiled shape.
        pixels = np.concatenate([pixels, np.zeros((batch_size - n,) + pixels.shape[1:],
                                                  pixels.dtype)])
      tokens = np.asarray(fns["generate"](
          params, pixels, seed=decode_options.batch_seed(seed, i), where="--",
          **options))
      out += [(names[j], fns["detokenize"](t)) for j, t in zip(kept, tokens[:n])]
  return out, skipped


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if _BATCH.value < 1:
      raise errors.ConfigError(f"--batch_size={_BATCH.value} must be >= 1.")
    options = dict(method=_METHOD.value, beam_size=_BEAM.value,
                   length_penalty=_ALPHA.value, top_p=_TOP_P.value,
                   temperature=_TEMP.value, max_len=_MAX_LEN.value)
    decode_options.check(seed=_SEED.value, where="--", **options)  # Before loading.
    images = list_images(_IMAGES.value)
    step = None if _STEP.value < 0 else _STEP.value
    exp, params, where = load_run(_WORKDIR.value, step)
    logging.info("Captioning %d images with %s (%s).", len(images), where,
                 _METHOD.value)
    captions, skipped = caption_images(exp, params, images, _BATCH.value,
                                       _ON_BAD.value, _SEED.value, **options)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + ".tmp", "w") as f:
    for name, caption in captions:
      f.write(json.dumps({"image": name, "caption": caption}) + "\n")
  os.replace(_OUT.value + ".tmp", _OUT.value)
  print(f"wrote {len(captions)} captions to {_OUT.value}"
        + (f"; skipped {len(skipped)} unreadable image(s): "
           + ", ".join(p for p, _ in skipped) if skipped else ""))


if __name__ == "__main__":
  app.run(main)
