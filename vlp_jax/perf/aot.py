"""Ahead-of-time compilation of the trainer's step for a TPU slice that is described,
not present (`jax.experimental.topologies`; needs the TPU compiler, `pip install -e
".[tpu]"`, on any host, CPU included).

The step, state and shardings are the trainer's own (`TrainSetup`, as `main.py` builds
them); only the devices are the slice's. Before anything compiles, `check_plan` names
the errors that only show at slice size: a mesh that does not match the device count,
a batch that does not split over the data-parallel devices or the hosts, a parameter
axis that a mesh axis does not divide, batch rows that more than one host would have
to read. Then `compile_report` lowers and compiles the step for the slice and reads
XLA's per-device memory and cost analyses and the collectives of the compiled program.
"""
import collections
import importlib.util
import math
import os
import re
import time
import types

from vlp_jax import batch_plan, errors, sharding
from vlp_jax.perf import chips


class AotError(errors.UserError, RuntimeError):
  """The slice cannot be compiled for here (no TPU compiler, unknown topology)."""


class DoesNotFit(errors.UserError, MemoryError):
  """The TPU compiler refused the step: it needs more HBM than a chip has."""

  def __init__(self, compiler_message: str, record: dict):
    first = compiler_message.strip().splitlines()[0][:600]
    super().__init__(
        f"The step does not fit a chip's HBM on this slice (mesh {record['mesh']}, "
        f"{record['per_device_batch']} examples per device). The compiler says: "
        f"{first}\nMake it fit with more FSDP (a larger config.mesh.fsdp), remat "
        f"(--config.model.remat=full), scanned blocks (--config.model.scan_layers="
        f"True), micro-batches (--config.accum_steps=K) or a smaller batch.")
    self.record = record


def slice_devices(topology: str, num_slices: int = 1):
  """The devices of TPU slice `topology` ('v5e:16x16', 'v5p-512', ...: chips.
  parse_topology), or of `num_slices` such slices (multi-slice, `slice_index`), each
  with its host (`process_index`); one device per chip on v4 and v5p (megacore, as
  TPU VMs run them)."""
  try:
    gen, dims, megacore = chips.parse_topology(topology)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if importlib.util.find_spec("libtpu") is None:
    raise AotError(
        "Compiling for a TPU slice needs the TPU compiler (libtpu), which is not "
        "installed: pip install -e \".[tpu]\" (it runs on this host; no TPU needed).")
  chips.quiet_tpu_runtime()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name = chips.topology_name(gen, dims)
  try:
    # 2x2x1 chips per host: the multi-host TPU VMs of v4, v5e, v5p and v6e slices.
    desc = topologies.get_topology_desc(
        topology_name=name, platform="tpu",
        chip_config_name="megacore" if megacore else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=int(num_slices))
  except Exception as e:  # pylint: disable=broad-except
    raise AotError(f"The TPU compiler does not know topology '{name}' "
                   f"(from '{topology}'): {e}") from e
  return list(desc.devices)


def physical_dims(devices) -> list:
  """The slice's chip grid from the devices' coordinates, e.g. [4, 8, 8] (one entry per
  axis larger than 1; a megacore chip counts once)."""
  first = min(getattr(d, "slice_index", 0) or 0 for d in devices)
  coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices
            if (getattr(d, "slice_index", 0) or 0) == first]  # one slice's grid
  if not coords or not coords[0]:
    return [len(devices)]
  return [len({c[i] for c in coords}) for i in range(len(coords[0]))
          if len({c[i] for c in coords}) > 1] or [1]


def suggest_mesh(mesh: dict, dims) -> str:
  """A mesh of the same device count whose FSDP size is a product of physical axes:
  data takes the first axes, fsdp the rest (e.g. data=4, fsdp=64 on 4x8x8)."""
  dims = sorted(dims)
  for k in range(len(dims)):
    data = math.prod(dims[:k])
    if data >= mesh.get("data", 1) and mesh.get("tensor", 1) == 1:
      return f"--config.mesh.data={data} --config.mesh.fsdp={math.prod(dims[k:])}"
  return "--config.mesh.data=1 --config.mesh.fsdp=-1"


def hosts(devices) -> dict:
  """{process_index: number of devices}: the slice's hosts."""
  return dict(sorted(collections.Counter(d.process_index for d in devices).items()))


def check_mesh(config, num_devices: int, where: str = "") -> dict:
  """{axis: size} of `config.mesh` on `num_devices` devices, or a ConfigError naming
  the fix."""
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices)
  except (KeyError, ValueError) as e:
    raise errors.ConfigError(
        f"{str(e).strip(chr(39))} {where}Set the mesh to multiply to {num_devices}, "
        f"e.g. --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 "
        f"(-1: all remaining devices).") from None
  return dict(zip(sharding.MESH_AXES, sizes))


def check_batch(config, mesh_sizes: dict, rules, num_hosts: int) -> batch_plan.BatchPlan:
  """The batch plan on a slice of `num_hosts` hosts, or a ConfigError naming the
  batch sizes that split (batch_plan.make)."""
  shards = sharding.batch_shards(types.SimpleNamespace(shape=mesh_sizes), rules)
  return batch_plan.make(config.batch_size, config.accum_steps, num_hosts, 0, shards,
                         mesh_desc=str(mesh_sizes))


def indivisible_leaves(abstract, mesh) -> list:
  """[(path, shape, spec, problem)] for every array of `abstract` (ShapeDtypeStructs
  with NamedShardings on `mesh`) whose dimension a mesh axis size does not divide."""
  import jax  # pylint: disable=g-import-not-at-top
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    if spec is None:
      continue
    for dim, entry in zip(leaf.shape, spec):
      axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if size > 1 and dim % size:
        out.append((jax.tree_util.keystr(path), tuple(leaf.shape), str(spec),
                    f"dimension {dim} over mesh axes {axes} of size {size}"))
  return out


def param_leaves(config, mesh_sizes: dict):
  """The model's parameters as leaves with `.shape` and `.sharding.spec` (mesh axes,
  from their logical axis names and config.sharding_rules) and a stand-in mesh of
  `mesh_sizes`: what `indivisible_leaves` needs, with no devices (jax.eval_shape)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  model = build_model(config.model)
  init = lambda rng: model.init({"params": rng, "dropout": rng},
                                state_lib.dummy_batch(config), train=False)["params"]
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = sharding.rules_from_config(config.sharding_rules)
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  leaves = jax.tree.map(
      lambda x, spec: types.SimpleNamespace(
          shape=x.shape, dtype=x.dtype, sharding=types.SimpleNamespace(spec=spec)),
      nn.unbox(boxed), specs, is_leaf=is_spec)
  return leaves, types.SimpleNamespace(shape=dict(mesh_sizes))


def check_divisible(abstract, mesh, rules=()):
  """A ConfigError listing the arrays a mesh axis does not divide (parameters first;
  the optimizer state mirrors them) and the logical axes (`rules`) that put them on
  that mesh axis, naming the fix."""
  bad = indivisible_leaves(abstract, mesh)
  if not bad:
    return
  params = [b for b in bad if not b[0].startswith(".opt_state")] or bad
  lines = "\n".join(f"  {p} {s} {spec}: {why}" for p, s, spec, why in params[:12])
  more = len(bad) - min(len(params), 12)
  more_note = (f"\n  ... and {more} more" + (" (the optimizer state of the same)"
                                              if len(params) <= 12 else ""))
  axes = sorted({a for *_, why in bad  # "... over mesh axes ('tensor',) of size 4"
                 for a in re.findall(r"'(\w+)'", why.split(" of size")[0])})
  logical = sorted(name for name, target in rules if name != "batch" and set(
      (target,) if isinstance(target, str) else (target or ())) & set(axes))
  raise errors.ConfigError(
      f"{len(bad)} state arrays do not split evenly over mesh {dict(mesh.shape)}:\n"
      f"{lines}" + (more_note if more else "") +
      f"\nUse mesh sizes that divide these dimensions (config.mesh.{' or '.join(axes)} "
      f"a divisor of the model's widths, heads and vocabulary, with config.mesh.data "
      f"taking the rest of the devices), or keep the logical axes on mesh "
      f"axes {axes} ({', '.join(logical) or 'see config.sharding_rules'}) unsharded: "
      f"--config.sharding_rules.NAME=''.")


def host_batch_layout(config, batch_sharding, devices) -> dict:
  """What each host's pipeline reads and hands to make_array_from_process_local_data:
  rows per host (global batch / hosts), its local array shapes, and whether every
  host's devices hold exactly that many distinct rows in one block. A ConfigError when
  a host's devices need more rows than it reads (batch rows replicated across hosts:
  a mesh axis not in the batch's spans hosts)."""
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  shapes = benchmark.batch_layout(config)
  b = config.batch_size
  per_host = collections.defaultdict(set)
  for device, index in batch_sharding.devices_indices_map((b,)).items():
    rows = index[0]
    per_host[device.process_index].add((rows.start or 0, b if rows.stop is None
                                        else rows.stop))
  n_hosts = len(per_host)
  want = b // n_hosts
  counts, contiguous = [], True
  for blocks in per_host.values():
    blocks = sorted(blocks)
    counts.append(sum(stop - start for start, stop in blocks))
    contiguous &= all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1))
  if max(counts) != want or min(counts) != want:
    raise errors.ConfigError(
        f"On this slice each of the {n_hosts} hosts reads {want} rows of the "
        f"{b}-row batch, but its devices hold {max(counts)} distinct rows: the batch "
        f"is replicated over a mesh axis that spans hosts. Keep mesh axes outside "
        f"the batch's ({batch_sharding.spec[0]}) within one host "
        f"({len(devices) // n_hosts} devices), e.g. a smaller config.mesh.tensor.")
  return {"hosts": n_hosts, "devices_per_host": len(devices) // n_hosts,
          "per_host_batch": want, "rows_contiguous_per_host": contiguous,
          "host_shapes": {k: [want, *s[1:]] for k, (s, _) in shapes.items()},
          "global_shapes": {k: list(s) for k, (s, _) in shapes.items()}}


def check_plan(config, devices) -> dict:
  """Every check that needs no compile (mesh, batch, hosts); returns the plan facts."""
  n_hosts = len(hosts(devices))
  sizes = check_mesh(config, len(devices), where=f"The slice has {len(devices)} "
                     f"devices on {n_hosts} hosts. ")
  rules = sharding.rules_from_config(config.sharding_rules)
  plan = check_batch(config, sizes, rules, n_hosts)
  return {"mesh": sizes, "num_devices": len(devices), "hosts": n_hosts,
          "per_device_batch": plan.per_shard, "accum_steps": plan.accum_steps}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest
  shard of each array)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) \
        else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return int(total)


def state_bytes(abstract) -> dict:
  """Per-device bytes of the train state's parts (params, opt_state, teacher, queue)."""
  out = {"params": per_device_bytes(abstract.params),
         "opt_state": per_device_bytes(abstract.opt_state)}
  for name in ("teacher", "queue"):
    if getattr(abstract, name, None) is not None:
      out[name] = per_device_bytes(getattr(abstract, name))
  return out


def fits(peak: float, hbm) -> dict:
  """{'fits', 'hbm_fraction', 'warning'} of `peak` bytes on a device of `hbm` bytes."""
  if not hbm:
    return {"fits": None, "hbm_fraction": None, "warning": "unknown HBM size"}
  frac = peak / hbm
  warn = ("over the device's memory" if frac > 1 else
          "within 10% of the device's memory: the runtime's own reserve may not fit"
          if frac > 0.9 else "")
  return {"fits": frac <= 1.0, "hbm_fraction": frac, "warning": warn}


def memory_record(compiled) -> dict:
  """XLA's per-device memory analysis: arguments (state + batch), outputs, the bytes
  outputs share with donated arguments, temporaries (activations and workspace), and
  peak = arguments + outputs - aliased + temporaries."""
  m = compiled.memory_analysis()
  get = lambda k: int(getattr(m, k, 0) or 0)
  out = {"argument_bytes": get("argument_size_in_bytes"),
         "output_bytes": get("output_size_in_bytes"),
         "alias_bytes": get("alias_size_in_bytes"),
         "temp_bytes": get("temp_size_in_bytes"),
         "code_bytes": get("generated_code_size_in_bytes")}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                       - out["alias_bytes"] + out["temp_bytes"])
  return out


def unrolled_flops(config) -> float:
  """XLA's FLOPs of the whole step (all devices together) with the blocks unrolled,
  no remat and no accumulation loop, from the cost analysis of the step lowered for
  one CPU device (nothing compiles; the global program's FLOPs do not depend on the
  platform or the mesh). XLA counts a loop's body once, so a scanned (or accumulated)
  step's own count covers one block per tower (one micro-batch); this one counts the
  model's FLOPs as the analytic count does (remat's second forward pass adds about a
  third on top of both)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax.perf import hlo_stats  # pylint: disable=g-import-not-at-top
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  unrolled.model.remat = "none"  # model FLOPs: no second forward pass
  unrolled.accum_steps = 1  # accumulation's loop would be counted once, too
  unrolled.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  unrolled.model.attention_impl = "xla"  # the platform-free form (no cuDNN, no Pallas)
  cost = hlo_stats.lower_train_step(unrolled, jax.devices("cpu")[:1])[0].cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def compile_report(config, devices, mfu: float = 0.4, dump_hlo: str = "") -> dict:
  """Checks, lowers and compiles `config`'s train step for `devices` (a slice's);
  the record tools/aot_compile.py prints. `dump_hlo`: write the compiled HLO there."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax.perf import benchmark, flops as flops_lib, hlo_stats  # pylint: disable=g-import-not-at-top
  from vlp_jax.train.setup import TrainSetup  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.evals = {}
  record = check_plan(config, devices)
  kind = devices[0].device_kind
  t0 = time.perf_counter()
  try:
    setup = TrainSetup(config, devices)
  except NotImplementedError as e:  # jax.make_mesh: no axis assignment on the torus
    if "physical mesh" not in str(e):
      raise
    physical = physical_dims(devices)
    raise errors.ConfigError(
        f"Mesh {record['mesh']} cannot be laid on this slice's chips "
        f"({'x'.join(map(str, physical))}): "
        f"each mesh axis larger than 1 must be a product of some of the slice's "
        f"physical axis sizes. Choose sizes such as "
        f"{suggest_mesh(record['mesh'], physical)}.") from None
  check_divisible(setup.abstract, setup.mesh, setup.rules)
  record["host_data"] = host_batch_layout(config, setup.batch_sharding, devices)
  batch = benchmark.abstract_batch(config, setup.batch_sharding)
  with setup.contexts()[0], setup.contexts()[1]:
    lowered = setup.step_fn.lower(setup.abstract, batch)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "memory space hbm" not in str(e) and "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(str(e), record) from None
  t2 = time.perf_counter()
  text = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(text)
  leaves = jax.tree.leaves(setup.abstract.params)
  hbm, hbm_source = chips.hbm_bytes(kind)
  memory = memory_record(compiled)
  memory.update(state=state_bytes(setup.abstract), hbm_bytes=hbm, hbm_source=hbm_source,
                **fits(memory["peak_bytes"], hbm))
  n = len(devices)
  analytic = flops_lib.train_flops_per_sample(config) * config.batch_size / n
  xla, xla_source = flops_lib.xla_flops(compiled), "compiled program"
  if config.model.get("scan_layers") or config.accum_steps > 1 or (
      config.model.get("remat", "none") != "none"):
    xla, xla_source = unrolled_flops(config) / n, "unrolled lowering, no remat"
  peak = flops_lib.table_peak_flops(kind, config.model.dtype)
  record.update(
      device_kind=kind, num_params=int(sum(x.size for x in leaves)),
      global_batch=config.batch_size, dtype=config.model.dtype,
      memory=memory,
      flops={"xla_per_device": xla, "xla_source": xla_source,
             "analytic_per_device": analytic,
             "xla_over_analytic": xla / analytic if xla and analytic else None},
      collectives=hlo_stats.collectives(text),
      lower_s=t1 - t0, compile_s=t2 - t1)
  if peak:
    step_s = analytic / (peak * mfu)
    record["expected"] = {"mfu": mfu, "peak_flops_per_device": peak,
                          "step_time_s": step_s,
                          "samples_per_s": config.batch_size / step_s}
  return record
