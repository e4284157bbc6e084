"""Accelerator memory per JAX device, and the TPU slice names users type.

HBM figures are the vendors' published capacities, in the unit each page states (GB =
1e9 bytes, GiB = 2**30; where a page says GB of a GiB-sized part, about 7% is
left in hand), per JAX device: one device per chip on v4 and v5p (megacore,
as TPU VMs run them), v5e and v6e (one TensorCore per chip), and GPUs; one device per
TensorCore on v3. XLA and the runtime keep a little of it for themselves, so a program
within a few percent of the figure may still not fit (`aot.fits` warns above 90%).
"""
import math
import os

GIB = 2 ** 30

# (substring of device_kind, lowercase; first match wins) -> (bytes per device, source)
HBM_BYTES = (
    ("tpu v3", 16 * GIB, "Cloud TPU docs, 'TPU v3': 32 GiB HBM per chip, two "
                         "TensorCores (one JAX device each)"),
    ("tpu v4", 32 * GIB, "Cloud TPU docs, 'TPU v4': HBM2 32 GiB per chip"),
    ("tpu v5 lite", 16e9, "Cloud TPU docs, 'TPU v5e': HBM capacity per chip 16 GB"),
    ("tpu v5", 95e9, "Cloud TPU docs, 'TPU v5p': HBM2e 95 GB per chip"),
    ("tpu v6 lite", 32e9, "Cloud TPU docs, 'TPU v6e': HBM capacity per chip 32 GB"),
    ("gh200", 96e9, "NVIDIA GH200 datasheet: 96 GB HBM3 (the 144 GB HBM3e part "
                    "holds more)"),
    ("h100", 80e9, "NVIDIA H100 SXM5 datasheet: 80 GB HBM3"),
    ("h200", 141e9, "NVIDIA H200 datasheet: 141 GB HBM3e"),
    ("a100 80gb", 80e9, "NVIDIA A100 datasheet: 80 GB HBM2e"),
    ("a100-sxm4-80gb", 80e9, "NVIDIA A100 datasheet: 80 GB HBM2e"),
    ("a100", 40e9, "NVIDIA A100 datasheet: 40 GB HBM2"),
)


def hbm_bytes(device_kind: str):
  """(HBM bytes of one device of `device_kind`, source), or (None, '') if unknown."""
  kind = device_kind.lower()
  for key, size, source in HBM_BYTES:
    if key in kind:
      return float(size), source
  return None, ""


# Generation -> (accelerator-type prefix, devices in its size suffix per chip, topology
# rank, megacore). Cloud names count TensorCores for v4 / v5p (v4-8 is 4 chips) and
# chips for v5e / v6e (v5litepod-16 is 16 chips).
GENERATIONS = {
    "v4": ("v4", 2, 3, True),
    "v5p": ("v5p", 2, 3, True),
    "v5e": ("v5litepod", 1, 2, False),
    "v6e": ("v6e", 1, 2, False),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


def _shape_3d(chips: int):
  """The Cloud TPU docs' default 3D slice shape of `chips` chips (2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...): doubling the smallest axis, last first."""
  if chips < 4 or chips & (chips - 1):
    return None
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    i = max(i for i in range(3) if dims[i] == min(dims))
    dims[i] *= 2
  return dims if chips == 4 else sorted(dims)  # 2x2x1, then 2x2x2, 2x2x4, ...


def _shape_2d(chips: int):
  """v5e / v6e slice shapes: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
  if chips < 1 or chips & (chips - 1) or chips == 2:
    return None
  a = 1 << (chips.bit_length() - 1) // 2
  return [a, chips // a]


def parse_topology(name: str):
  """'v5e:16x16', 'v5litepod-256', 'v5p-512' or 'v4:4x4x8' -> (generation, dims,
  megacore). ValueError naming valid forms otherwise."""
  text = name.strip().lower()
  gen, sep, rest = (text.partition(":") if ":" in text else text.partition("-"))
  gen = ALIASES.get(gen, gen)
  if gen not in GENERATIONS or not sep or not rest:
    raise ValueError(
        f"Unknown TPU topology '{name}'. Use GENERATION:SHAPE (e.g. v5e:2x2, v5e:16x16, "
        f"v5p:4x8x8, v4:8x8x8, v6e:16x16) or a Cloud accelerator type (e.g. "
        f"v5litepod-256, v5p-512, v4-1024, v6e-256); generations: {sorted(GENERATIONS)}.")
  _, per_chip, rank, megacore = GENERATIONS[gen]
  if sep == ":":
    try:
      dims = [int(d) for d in rest.split("x")]
    except ValueError:
      dims = []
    if len(dims) != rank or min(dims, default=0) < 1:
      raise ValueError(f"TPU topology '{name}': {gen} slices have {rank} dimensions, "
                       f"e.g. {gen}:{'x'.join(['2'] * rank if rank == 2 else ['2', '2', '1'])}.")
    return gen, dims, megacore
  if not rest.isdigit() or int(rest) % per_chip:
    raise ValueError(f"TPU accelerator type '{name}': the suffix counts "
                     f"{'TensorCores (2 per chip)' if per_chip == 2 else 'chips'}, "
                     f"e.g. {GENERATIONS[gen][0]}-{8 * per_chip}.")
  chips = int(rest) // per_chip
  dims = (_shape_3d if rank == 3 else _shape_2d)(chips)
  if dims is None:
    raise ValueError(f"TPU accelerator type '{name}' ({chips} chips) has no standard "
                     f"slice shape; give the shape, e.g. {gen}:" +
                     ("4x4x8" if rank == 3 else "16x16") + ".")
  return gen, dims, megacore


def topology_name(gen: str, dims) -> str:
  """The name `jax.experimental.topologies` takes: 'v5e:16x16'."""
  return f"{gen}:{'x'.join(str(d) for d in dims)}"


def quiet_tpu_runtime():
  """Environment for using libtpu's compiler on a host without a TPU: no probing for
  a TPU or a cloud metadata server (and none of the warnings that probing prints), and
  no process-wide lock (several compiles, e.g. parallel tests, may run at once). Set
  before jax is imported to silence its start-up warnings too."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-1")):
    os.environ.setdefault(key, value)
