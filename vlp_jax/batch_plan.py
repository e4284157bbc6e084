"""Batch arithmetic, resolved and checked once: the global batch, each process's rows,
each micro-batch of gradient accumulation and each data-parallel shard's rows.

Everything downstream (the data pipeline, the train step, accumulation) receives these
numbers instead of dividing and checking on its own.
"""
import dataclasses
import math

from vlp_jax import errors


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How a global batch of `global_batch` examples is divided.

  global_batch: examples per optimisation step (`config.batch_size`).
  accum_steps: micro-batches per step (`config.accum_steps`).
  process_count / process_index: the hosts reading data and this one.
  data_shards: how many ways the mesh splits the batch axis (data-parallel devices).
  """
  global_batch: int
  accum_steps: int = 1
  process_count: int = 1
  process_index: int = 0
  data_shards: int = 1

  @property
  def per_process(self) -> int:
    """Rows of each global batch this process reads."""
    return self.global_batch // self.process_count

  @property
  def process_offset(self) -> int:
    """Index in the global batch of this process's first row."""
    return self.process_index * self.per_process

  @property
  def micro_batch(self) -> int:
    """Examples per micro-batch (the whole batch without accumulation)."""
    return self.global_batch // self.accum_steps

  @property
  def per_shard(self) -> int:
    """Examples each data-parallel shard computes per micro-batch."""
    return self.micro_batch // self.data_shards


def make(global_batch: int, accum_steps: int = 1, process_count: int = 1,
         process_index: int = 0, data_shards: int = 1, mesh_desc: str = "") -> BatchPlan:
  """A checked BatchPlan; a batch that does not divide is one ConfigError naming every
  constraint and the nearest valid batch sizes."""
  for name, value in (("config.batch_size", global_batch),
                      ("config.accum_steps", accum_steps)):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise errors.ConfigError(f"{name} must be a positive integer, got {value!r}.")
  # Every micro-batch splits over the shards, every global batch over the processes.
  unit = math.lcm(accum_steps * data_shards, process_count)
  if global_batch % unit:
    lower = global_batch // unit * unit
    options = " or ".join(str(b) for b in (lower, lower + unit) if b > 0)
    mesh = f" of mesh {mesh_desc}" if mesh_desc else ""
    raise errors.ConfigError(
        f"config.batch_size={global_batch} cannot be divided evenly: each of the "
        f"config.accum_steps={accum_steps} micro-batches must split over the "
        f"{data_shards} data-parallel shards{mesh} and each global batch over the "
        f"{process_count} processes, so the batch size must be a multiple of {unit}; "
        f"use e.g. {options}.")
  return BatchPlan(global_batch, accum_steps, process_count, process_index, data_shards)


def from_mesh(config, mesh, rules) -> BatchPlan:
  """The plan of `config` on `mesh` (logical-axis `rules`) in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax import sharding  # pylint: disable=g-import-not-at-top
  return make(config.batch_size, config.accum_steps, jax.process_count(),
              jax.process_index(), sharding.batch_shards(mesh, rules),
              mesh_desc=str(dict(mesh.shape)))


def for_processes(config) -> BatchPlan:
  """The plan without a mesh (data pipelines built on their own, e.g. by tools)."""
  import jax  # pylint: disable=g-import-not-at-top
  return make(config.batch_size, config.accum_steps, jax.process_count(),
              jax.process_index())
