"""Is a checkpoint step complete? And moving damaged steps out of Orbax's sight.

`problems(step_dir, ...)` is a cheap structural check (the files a restore needs, the
`meta` JSON parses); the restore itself is the full check (it reads every array, so a
missing or truncated chunk fails it). `summarize(exc)` turns a restore exception (a
TensorStore dump can be 145 lines) into one line. `quarantine` moves a damaged step to
`workdir/checkpoints_damaged/STEP[.N]`, so nothing is deleted and Orbax neither lists
it nor refuses to save that step again.
"""
import json
import os
import shutil

import jax

DAMAGED_DIR = "checkpoints_damaged"


def problems(step_dir: str, with_data: bool) -> list:
  """What is missing or unreadable in checkpoint directory `step_dir` ([] = looks whole)."""
  if not os.path.isdir(step_dir):
    return ["the step directory is gone"]
  if not os.listdir(step_dir):
    return ["the step directory is empty"]
  out = []
  state = os.path.join(step_dir, "state")
  if not os.path.isdir(state):
    out.append("'state/' (params and optimizer state) is missing")
  else:
    for name in ("_METADATA", "manifest.ocdbt"):
      if not os.path.exists(os.path.join(state, name)):
        out.append(f"'state/{name}' is missing")
  if with_data:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = os.path.join(step_dir, "data", name)
    if not os.path.exists(path):
      out.append(f"the data-iterator position 'data/{name}' is missing")
    else:
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        out.append(f"'data/{name}' is unreadable ({e})")
  meta = os.path.join(step_dir, "meta", "metadata")
  if os.path.isdir(os.path.dirname(meta)):
    try:
      with open(meta) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      out.append(f"'meta/metadata' is unreadable ({e})")
  return out


def summarize(exc: BaseException, limit: int = 300) -> str:
  """One line for a restore exception: its type and the first line of its message."""
  lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"reading it failed: {type(exc).__name__}: {text}"


def quarantine(workdir_checkpoints: str, step: int) -> str:
  """Moves `workdir_checkpoints/STEP` to `../checkpoints_damaged/STEP` (a free name);
  returns the new path."""
  src = os.path.join(workdir_checkpoints, str(step))
  root = os.path.join(os.path.dirname(os.path.abspath(workdir_checkpoints)), DAMAGED_DIR)
  os.makedirs(root, exist_ok=True)
  dst, n = os.path.join(root, str(step)), 1
  while os.path.exists(dst):
    dst, n = os.path.join(root, f"{step}.{n}"), n + 1
  shutil.move(src, dst)
  return dst
