"""Checks run before anything compiles: writable workdir, free space, config changes."""
import json
import os
import shutil
import uuid

import jax
import numpy as np
from absl import logging

from vlp_jax import errors

# Keys (or key prefixes) that change what a checkpoint holds or means: a saved config
# that differs here from the new one is an error unless the change is deliberate.
MODEL_KEYS = ("model.", "data.image_size", "data.tokenizer", "frozen")


def check_workdir(workdir: str, abstract_state=None, keep: int = 1, best: bool = False):
  """Creates `workdir` and its `checkpoints/` (and `checkpoints_best/` with `best`, i.e.
  a `best_metric`), test-writes a file in each, and raises `errors.WorkdirError` naming
  the directory and the cause if one is not writable (permission, full disk, quota) or
  the checkpoints' disk has less free space than one checkpoint; warns below `keep + 1`
  checkpoints."""
  if "://" in workdir:  # Remote file systems (gs://...) are checked by Orbax itself.
    return
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for path in [workdir, ckpt_dir] + ([os.path.join(workdir, "checkpoints_best")]
                                     if best else []):
    _check_writable(path, workdir)
  if abstract_state is None:
    return
  need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))
  free = shutil.disk_usage(ckpt_dir).free  # Where checkpoints go (may be a mount).
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  if free < need:
    raise errors.WorkdirError(
        f"Only {gib(free)} free under {ckpt_dir} (--workdir={workdir}), but one "
        f"checkpoint needs about {gib(need)}; free space or choose another workdir.")
  if free < need * (keep + 1):
    logging.warning("Only %s free under %s: room for fewer than keep_checkpoints+1=%d "
                    "checkpoints of about %s each.", gib(free), ckpt_dir, keep + 1,
                    gib(need))


def write_probe(directory: str):
  """Writes, then removes, a uniquely named file in `directory` (raises OSError)."""
  probe = os.path.join(directory, f".write_test_{uuid.uuid4().hex}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def _check_writable(path: str, workdir: str):
  """Creates `path` if missing and writes (then removes) a file in it."""
  try:
    os.makedirs(path, exist_ok=True)
    write_probe(path)
  except OSError as e:
    cause = (e.strerror or str(e)).lower()
    err = errors.WorkdirError(
        f"{path} is not writable ({cause}; --workdir={workdir}), so the run did not "
        "start. Make it writable by the user running the training (check its owner and "
        "mode, free space or quota), or choose another --workdir.")
    err.errno = e.errno
    raise err from None


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, new: dict):
  """(model changes, other changes): lists of 'key: saved -> new'."""
  a, b = _flatten(saved), _flatten(new)
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  diffs = [k for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]
  fmt = lambda k: f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
  model = [fmt(k) for k in diffs if k.startswith(MODEL_KEYS)]
  other = [fmt(k) for k in diffs if not k.startswith(MODEL_KEYS)]
  return model, other


def check_config_change(workdir: str, new: dict, allow: bool):
  """Compares a resumed workdir's saved config.json with the new config: model changes
  are an error unless `allow`; other changes (schedule, logging, ...) a warning."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  model, other = config_changes(saved, json.loads(json.dumps(new)))
  if model and not allow:
    raise errors.ConfigError(
        f"The config differs from the one {workdir} was trained with (config.json) in "
        f"model keys: {'; '.join(model)}. Use a fresh --workdir, the original config, "
        "or pass --allow_config_change if the change is deliberate.")
  if model or other:
    logging.warning("Resuming %s with a changed config: %s", workdir,
                    "; ".join(model + other))
