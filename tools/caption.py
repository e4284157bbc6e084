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
{"image": path, "caption": text}, in input order. An unreadable image is skipped
with a warning (listed at the end) unless --on_bad=fail, which stops with an error
naming it. Decoding: models/generate.py (KV-cached greedy, beam search with GNMT's
length penalty ((5 + n) / 6) ** length_penalty, nucleus sampling).
"""
import json
import os
import sys
from typing import List

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import errors  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained CoCa run (config.json + "
                               "checkpoints/).")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images, or jsonl:FILE.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL file.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the newest good one).")
_METHOD = flags.DEFINE_enum("method", "greedy", ["greedy", "beam", "sample"],
                            "Decoding method.")
_BEAM = flags.DEFINE_integer("beam_size", 4, "--method=beam: hypotheses per image.")
_ALPHA = flags.DEFINE_float("length_penalty", 0.6, "--method=beam: GNMT alpha "
                            "(0 = rank by log-probability; larger = longer captions).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "--method=sample: nucleus mass in (0, 1].")
_TEMP = flags.DEFINE_float("temperature", 1.0, "--method=sample: logits divided by it.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Tokens per caption incl. BOS "
                                "(0: the model's text context length).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per decoding batch.")
_SEED = flags.DEFINE_integer("seed", 0, "--method=sample: PRNG seed (batch i uses "
                             "seed + i).")
_ON_BAD = flags.DEFINE_enum("on_bad", "skip", ["skip", "fail"], "An unreadable image: "
                            "skip it with a warning, or stop with an error.")
flags.mark_flags_as_required(["workdir", "images", "out"])


def list_images(spec: str) -> List[str]:
  """The image paths of a folder or of a `jsonl:FILE` (module docstring), in order."""
  from vlp_jax.data import sources_files  # pylint: disable=g-import-not-at-top
  if spec.startswith("jsonl:"):
    path = spec[len("jsonl:"):]
    if not os.path.isfile(path):
      raise errors.DataPathError(f"--images={spec}: no such file '{path}'. Pass "
                                 "jsonl:FILE with one {\"image\": path} object a line.")
    root, out = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          out.append(os.path.join(root, json.loads(line)["image"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise errors.DataError(f"{path}:{line_no}: expected a JSON object with an "
                                 f"'image' key ({e!r}).") from e
  elif os.path.isdir(spec):
    out = sorted(os.path.join(d, n) for d, _, names in os.walk(spec) for n in names
                 if n.lower().endswith(sources_files.IMAGE_EXTENSIONS))
  else:
    raise errors.DataPathError(f"--images={spec!r} is neither a folder nor jsonl:FILE.")
  if not out:
    raise errors.DataError(f"--images={spec} lists no images (folders: files ending in "
                           f"{', '.join(sources_files.IMAGE_EXTENSIONS)}).")
  return out


def load_config(workdir: str):
  """The config a run was trained with (WORKDIR/config.json)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise errors.WorkdirError(f"Workdir not found: '{workdir}'. Pass the --workdir of "
                              "a trained run.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise errors.WorkdirError(f"'{workdir}' has no config.json: pass the workdir of a "
                              "trained vlp_jax run (main.py --workdir=...).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step=None):
  """(Experiment, params, where from) of a trained captioning run."""
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  if "caption_logits" not in models.output_names(config.model):
    raise errors.ConfigError(
        f"The model of '{workdir}' ('{config.model.name}') has no text decoder: "
        "captions need a captioning model (model.name='coca').")
  config.evals = {}
  exp = loop.Experiment(config, workdir)
  params, _, where = loop.eval_params(exp, workdir, step)
  return exp, params, where


def read_images(paths, image_size: int, normalization: str, on_bad: str):
  """(images [N, S, S, 3] float32 of the readable paths, their paths, the skipped
  (path, reason) pairs). `on_bad='fail'` raises DataError at the first bad one."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import decode, transforms  # pylint: disable=g-import-not-at-top
  images, kept, bad = [], [], []
  for path in paths:
    try:
      image = transforms.resize_center_crop(decode.load_image(path), image_size)
    except (decode.BadRecord, OSError) as e:
      if on_bad == "fail":
        raise errors.DataError(f"Cannot read image '{path}' ({e}); fix or remove it, "
                               "or pass --on_bad=skip.") from e
      logging.warning("Skipping unreadable image '%s' (%s).", path, e)
      bad.append((path, str(e)))
      continue
    images.append(transforms.normalize(image, normalization))
    kept.append(path)
  return np.stack(images) if images else None, kept, bad


def caption_images(exp, params, paths, batch_size: int, on_bad: str = "skip",
                   seed: int = 0, **decode_options):
  """[(path, caption)] of the readable `paths` (read a batch at a time), and the
  skipped (path, reason) pairs. `decode_options`: `predict.generate_fn`'s."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fns, d = exp.predict_fns, exp.config.data
  out, skipped = [], []
  with jax.set_mesh(exp.mesh):
    for i, start in enumerate(range(0, len(paths), batch_size)):
      images, kept, bad = read_images(paths[start:start + batch_size], d.image_size,
                                      d.normalization, on_bad)
      skipped += bad
      if images is None:
        continue
      n = len(kept)
      if n < batch_size:  # One compiled shape.
        images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:],
                                                  images.dtype)])
      tokens = np.asarray(fns["generate"](params, images, seed=seed + i,
                                          where="--", **decode_options))
      out += [(p, fns["detokenize"](t)) for p, t in zip(kept, tokens[:n])]
  return out, skipped


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if _BATCH.value < 1:
      raise errors.ConfigError(f"--batch_size={_BATCH.value} must be >= 1.")
    paths = list_images(_IMAGES.value)
    step = None if _STEP.value < 0 else _STEP.value
    exp, params, where = load_run(_WORKDIR.value, step)
    from vlp_jax.models import generate  # pylint: disable=g-import-not-at-top
    context = exp.config.model.text.context_length
    generate.check_options(_METHOD.value, _BEAM.value, _ALPHA.value, _TOP_P.value,
                           _TEMP.value, _MAX_LEN.value or context, context, "--")
    logging.info("Captioning %d images with %s (%s).", len(paths), where, _METHOD.value)
    captions, skipped = caption_images(
        exp, params, paths, _BATCH.value, _ON_BAD.value, _SEED.value,
        method=_METHOD.value, beam_size=_BEAM.value, length_penalty=_ALPHA.value,
        top_p=_TOP_P.value, temperature=_TEMP.value, max_len=_MAX_LEN.value)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value + ".tmp", "w") as f:
    for path, caption in captions:
      f.write(json.dumps({"image": path, "caption": caption}) + "\n")
  os.replace(_OUT.value + ".tmp", _OUT.value)
  print(f"wrote {len(captions)} captions to {_OUT.value}"
        + (f"; skipped {len(skipped)} unreadable image(s): "
           + ", ".join(p for p, _ in skipped) if skipped else ""))


if __name__ == "__main__":
  app.run(main)
