"""Checks run before anything compiles: writable workdir, free space, config changes."""
import json
import os
import shutil
import uuid

import jax
import numpy as np
from absl import logging

# Keys (or key prefixes) that change what a checkpoint holds or means: a saved config
# that differs here from the new one is an error unless the change is deliberate.
MODEL_KEYS = ("model.", "data.image_size", "data.tokenizer", "frozen")


def check_workdir(workdir: str, abstract_state=None, keep: int = 1):
  """Creates `workdir` and errors clearly if it is not writable or its disk is full
  (free space below one checkpoint); warns below `keep + 1` checkpoints."""
  if "://" in workdir:  # Remote file systems (gs://...) are checked by Orbax itself.
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}); choose "
                          "a directory you can write to.") from None
  if abstract_state is None:
    return
  need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))
  free = shutil.disk_usage(workdir).free
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  if free < need:
    raise OSError(f"Only {gib(free)} free under --workdir={workdir}, but one checkpoint "
                  f"needs about {gib(need)}; free space or choose another workdir.")
  if free < need * (keep + 1):
    logging.warning("Only %s free under %s: room for fewer than keep_checkpoints+1=%d "
                    "checkpoints of about %s each.", gib(free), workdir, keep + 1,
                    gib(need))


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
    raise ValueError(
        f"The config differs from the one {workdir} was trained with (config.json) in "
        f"model keys: {'; '.join(model)}. Use a fresh --workdir, the original config, "
        "or pass --allow_config_change if the change is deliberate.")
  if model or other:
    logging.warning("Resuming %s with a changed config: %s", workdir,
                    "; ".join(model + other))
