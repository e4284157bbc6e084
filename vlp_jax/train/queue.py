"""A FIFO memory queue of teacher embeddings (MoCo, ALBEF, TCL): extra negatives.

    config.queue.size = 65536
    config.queue.entries = {"image": "teacher_view_emb/aug", "text": "teacher_text_emb"}

Each entry NAME holds the last `size` rows of a momentum-teacher output (`teacher_*`,
see `teacher.py`): after every step the output's global-batch rows ([B, ..., D] is
enqueued as [-1, D], e.g. a view group's K crops per example) overwrite the oldest
rows. Objectives declare `reads=('queue/NAME', ...)` and get the float32 [size, D]
queue as it was before this step's rows went in (no gradient).

* State: `TrainState.queue` = {'ptr': int32 [] (the row the next batch's rows start
  at), NAME: float32 [size, dim]}; `dim` is `config.queue.dim` (0 = the model's
  embed_dim). Rows are sharded over the data-parallel mesh axes (logical axis
  'batch'); every rows-per-step count must divide `size`. Rows are written at
  ptr, ptr + 1, ... modulo `size`, so the order stays first-in first-out even when
  a resumed run adds another number of rows per step than the pointer assumed.
* Start: L2-normalised random normal rows (as ALBEF/TCL initialise theirs), from the
  run's seed, one stream per entry, independent of the parameters' initialisation.
* Update: inside the jitted step, after the optimizer and the teacher update
  (ALBEF/TCL enqueue after computing the loss), with the teacher outputs of this
  step (computed before the update, like ALBEF's momentum features). A step skipped
  as non-finite leaves the queue unchanged. Checkpointed with the state: resume gives
  the same queue; `config.init_from` keeps it (a fresh run's start).
"""
import hashlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlp_jax import errors

PREFIX = "queue/"
PTR = "ptr"


def enabled(config) -> bool:
  """Whether `config` asks for a queue (`config.queue.size` > 0)."""
  q = config.get("queue")
  return q is not None and int(q.size) > 0


def entries(config) -> dict:
  """{queue name: teacher output name} ({} without a queue)."""
  return dict(config.queue.entries) if enabled(config) else {}


def is_queue_output(name: str) -> bool:
  return name.startswith(PREFIX)


def needed_teacher_outputs(config) -> tuple:
  """The teacher outputs the queue's entries are filled from."""
  return tuple(entries(config).values())


def dim(config) -> int:
  return int(config.queue.dim) or int(config.model.embed_dim)


def _entry_key(seed: int, name: str):
  digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0x5155), digest)


def init(config, boxed: bool = True):
  """A new queue state (None without a queue); `boxed` wraps the rows in logical
  partitioning ('batch', None) so `sharding.logical_shardings` shards them."""
  if not enabled(config):
    return None
  size, d = int(config.queue.size), dim(config)
  out = {PTR: jnp.zeros((), jnp.int32)}
  for name in sorted(entries(config)):
    rows = jax.random.normal(_entry_key(config.seed, name), (size, d), jnp.float32)
    rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
    out[name] = nn.LogicallyPartitioned(rows, ("batch", None)) if boxed else rows
  return out


def outputs(queue) -> dict:
  """{'queue/NAME': rows} (stop-gradient) for the objectives; {} without a queue."""
  if queue is None:
    return {}
  return {PREFIX + k: jax.lax.stop_gradient(v) for k, v in queue.items() if k != PTR}


def rows_of(value, name: str, size: int, d: int):
  """`value` [B, ..., D] -> [n, D] float32 rows, checked against the queue's size."""
  if value.ndim < 2 or value.shape[-1] != d:
    raise errors.ConfigError(
        f"config.queue.entries['{name}'] gives an output of shape {value.shape}, but "
        f"the queue holds rows of dimension {d} (config.queue.dim, 0 = "
        "config.model.embed_dim): enqueue an embedding output [B, D] or [B, K, D].")
  rows = value.reshape(-1, d).astype(jnp.float32)
  if size % rows.shape[0]:
    raise errors.ConfigError(
        f"config.queue.size={size} is not a multiple of the {rows.shape[0]} rows "
        f"entry '{name}' adds per step (global batch x views): choose a size that "
        "is, e.g. " + str(max(1, size // rows.shape[0]) * rows.shape[0]) + ".")
  return rows


def enqueue(queue, values: Mapping):
  """The queue after writing `values` ({queue name: [B, ..., D]}) at its pointer."""
  ptr = queue[PTR]
  new = {}
  n = None
  for name, rows in queue.items():
    if name == PTR:
      continue
    size, d = rows.shape
    r = rows_of(values[name], name, size, d)
    if n is not None and r.shape[0] != n:
      raise errors.ConfigError(
          f"config.queue.entries give different row counts per step ({n} and "
          f"{r.shape[0]} for '{name}'); every entry must add the same number of rows.")
    n = r.shape[0]
    # Rows ptr, ptr + 1, ... modulo size: a FIFO also when the pointer is not a
    # multiple of n (a batch size changed on resume).
    new[name] = rows.at[(ptr + jnp.arange(n)) % size].set(r)
  new[PTR] = ((ptr + n) % next(iter(new.values())).shape[0]).astype(jnp.int32)
  return new


def check_config(config) -> None:
  """ConfigError for a queue whose entries are not teacher outputs or that has no
  teacher, and for objectives reading queue entries that do not exist."""
  from vlp_jax.registry import OBJECTIVES  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import teacher  # pylint: disable=g-import-not-at-top
  names = entries(config)
  if enabled(config):
    if not names:
      raise errors.ConfigError(
          "config.queue.size > 0 but config.queue.entries is empty: name what each "
          "queue holds, e.g. {'image': 'teacher_image_emb', 'text': 'teacher_text_emb'}.")
    for name, output in names.items():
      if name == PTR or "/" in name:
        raise errors.ConfigError(f"config.queue.entries: '{name}' is not a valid queue "
                                 "name (no '/', not 'ptr').")
      if not isinstance(output, str) or not teacher.is_teacher_output(output):
        raise errors.ConfigError(
            f"config.queue.entries['{name}'] = '{output}' is not a momentum-teacher "
            "output: a queue holds teacher embeddings ('teacher_NAME', e.g. "
            "'teacher_image_emb').")
    if not teacher.enabled(config):
      raise errors.ConfigError(
          "config.queue holds momentum-teacher outputs, but config.teacher.params is "
          "empty: set it (e.g. ['.*']).")
  for obj in config.objectives.keys():
    for r in OBJECTIVES.info(obj)["reads"]:
      if is_queue_output(r) and r[len(PREFIX):] not in names:
        raise errors.ConfigError(
            f"Objective '{obj}' reads the queue '{r}', but config.queue "
            f"{'has the entries ' + str(sorted(names)) if names else 'is off'}: set "
            f"config.queue.size (e.g. 65536) and config.queue.entries."
            f"{r[len(PREFIX):]} to the teacher output it holds.")
