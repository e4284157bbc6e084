"""Device mesh from config and logical-axis -> mesh-axis rules.

Parameters and activations carry logical axis names; `config.mesh` names the mesh axis
sizes (`data`, `fsdp`, `tensor`; -1 = all remaining devices). Changing parallelism is a
config change only.
"""
import math

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: flax skips a mesh axis already used earlier in the same spec.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_img", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("proj", None),
    ("patch", None),
    ("length", None),
    ("layers", None),  # the stacked axis of scanned transformer blocks
)


def rules_from_config(rules_cfg):
  """{'batch': 'data,fsdp', 'embed': 'fsdp', 'length': '', ...} -> flax logical rules.

  Values name mesh axes, comma-separated; '' keeps that logical axis unsharded. An
  empty config means DEFAULT_RULES.
  """
  if not rules_cfg:
    return DEFAULT_RULES
  rules = []
  # ConfigDicts sort their keys: restore the default priority (batch before embed,
  # both claiming fsdp); logical axes unknown to the defaults come last.
  priority = [name for name, _ in DEFAULT_RULES]
  order = sorted(rules_cfg.keys(),
                 key=lambda k: priority.index(k) if k in priority else len(priority))
  for logical in order:
    axes = rules_cfg[logical]
    names = tuple(a.strip() for a in axes.split(",") if a.strip())
    unknown = set(names) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"config.sharding_rules.{logical} names unknown mesh axes "
                       f"{sorted(unknown)}; use {MESH_AXES}.")
    rules.append((logical, names[0] if len(names) == 1 else (names or None)))
  return tuple(rules)


def rules_to_config(rules=DEFAULT_RULES):
  """The inverse of `rules_from_config` (for the config schema's defaults)."""
  as_str = lambda axes: ",".join((axes,) if isinstance(axes, str) else axes or ())
  return {logical: as_str(axes) for logical, axes in rules}


def mesh_shape(mesh_cfg, num_devices: int):
  """Resolves the config's axis sizes (one may be -1) against `num_devices`."""
  unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
  if unknown:
    raise KeyError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} "
                       f"devices are not divisible by {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs "
                     f"{math.prod(sizes)} devices, but {num_devices} are available.")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types over `devices` (default: all). Devices of several
  TPU slices (multi-slice, joined by the data-center network) get a hybrid mesh:
  `data` spans the slices, everything else stays within one."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) or 0 for d in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  from vlp_jax import errors  # pylint: disable=g-import-not-at-top
  if shape[0] % slices:
    raise errors.ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, shape))} on {slices} TPU slices: the data "
        f"axis spans the slices, so config.mesh.data must be a multiple of {slices} "
        f"(e.g. --config.mesh.data={slices} --config.mesh.fsdp=-1).")
  per_slice = (shape[0] // slices,) + tuple(shape[1:])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_shardings(tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a (boxed, abstract) pytree from its logical axis names."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)


def batch_sharding(mesh, rules=DEFAULT_RULES):
  """Sharding of a batch array: leading axis over the data-parallel mesh axes."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch axis is split on `mesh`."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def make_global_batch(local_batch, mesh, rules=DEFAULT_RULES):
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
