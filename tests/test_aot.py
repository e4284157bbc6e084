"""tools/aot_compile.py: TPU slice names, the checks made before compiling, and (where
the TPU compiler, libtpu, is installed: `make test-aot`) compiling the demo and
clip_b16 for a v5e:2x2 slice from this CPU host."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from vlp_jax import cli, errors
from vlp_jax.perf import aot, chips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("name,want", [
    ("v5e:2x2", ("v5e", [2, 2], False)),
    ("v5e:16x16", ("v5e", [16, 16], False)),
    ("v5litepod-256", ("v5e", [16, 16], False)),
    ("v5litepod-8", ("v5e", [2, 4], False)),
    ("v6e-64", ("v6e", [8, 8], False)),
    ("v4-8", ("v4", [2, 2, 1], True)),      # 8 TensorCores = 4 chips
    ("v4-1024", ("v4", [8, 8, 8], True)),
    ("v5p-512", ("v5p", [4, 8, 8], True)),   # 512 TensorCores = 256 chips
    ("v5p-64", ("v5p", [2, 4, 4], True)),
    ("v5p:4x4x8", ("v5p", [4, 4, 8], True)),
])
def test_topology_names(name, want):
  assert chips.parse_topology(name) == want


@pytest.mark.parametrize("name,says", [
    ("v9:2x2", "Unknown TPU topology"), ("v5e:2x2x1", "2 dimensions"),
    ("v4:4x4", "3 dimensions"), ("v5p-7", "TensorCores"), ("v5litepod-2", "slice shape"),
    ("v5e", "Unknown TPU topology")])
def test_bad_topology_names_say_the_valid_forms(name, says):
  with pytest.raises(ValueError, match=says):
    chips.parse_topology(name)
  with pytest.raises(errors.ConfigError, match=says):
    aot.slice_devices(name)


def test_hbm_table():
  assert chips.hbm_bytes("TPU v5 lite")[0] == 16e9
  assert chips.hbm_bytes("TPU v5")[0] == 95e9  # v5p's device_kind
  assert chips.hbm_bytes("TPU v4")[0] == 32 * 2 ** 30
  assert chips.hbm_bytes("NVIDIA H100 80GB HBM3")[0] == 80e9
  assert chips.hbm_bytes("cpu") == (None, "")
  assert aot.fits(8e9, 16e9) == {"fits": True, "hbm_fraction": 0.5, "warning": ""}
  assert aot.fits(15e9, 16e9)["warning"] and aot.fits(17e9, 16e9)["fits"] is False


def _recipe(spec="configs/clip_b16.py", **overrides):
  c = cli.load_config_file(spec)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_mesh_that_does_not_match_the_slice_names_the_fix():
  c = _recipe(**{"mesh.data": 3, "mesh.fsdp": 1})
  with pytest.raises(errors.ConfigError, match=r"needs 3 devices.*256 devices.*fsdp=-1"):
    aot.check_mesh(c, 256, where="The slice has 256 devices on 64 hosts. ")
  assert aot.check_mesh(_recipe(), 256) == {"data": 256, "fsdp": 1, "tensor": 1}


def test_batch_that_does_not_split_over_a_pod_names_valid_sizes():
  c = _recipe(batch_size=1000)
  rules = aot.sharding.rules_from_config(c.sharding_rules)
  sizes = {"data": 1, "fsdp": 256, "tensor": 1}
  with pytest.raises(errors.ConfigError, match=r"multiple of 256; use e.g. 768 or 1024"):
    aot.check_batch(c, sizes, rules, num_hosts=64)
  c.batch_size = 32768
  plan = aot.check_batch(c, sizes, rules, num_hosts=64)
  assert (plan.per_shard, plan.per_process) == (128, 512)
  # Hosts count too: a batch that splits over 16 devices but not over 3 hosts.
  with pytest.raises(errors.ConfigError, match=r"3 processes.*multiple of 48"):
    aot.check_batch(_recipe(batch_size=32), {"data": 16, "fsdp": 1, "tensor": 1},
                    rules, num_hosts=3)


class _Mesh:
  def __init__(self, **shape):
    self.shape = shape


def _leaf(shape, spec):
  return types.SimpleNamespace(shape=shape, sharding=types.SimpleNamespace(spec=spec))


def test_indivisible_parameter_axes_are_listed_with_the_fix():
  mesh = _Mesh(data=1, fsdp=4, tensor=3)
  tree = {"ok": _leaf((8, 12), ("fsdp", "tensor")),
          "heads": _leaf((8, 16), (None, "tensor")),
          "embed": _leaf((6, 3), ("fsdp", None)),
          "both": _leaf((10, 8), (("fsdp", "tensor"), None)),
          "unsharded": _leaf((5, 7), (None, None))}
  bad = aot.indivisible_leaves(tree, mesh)
  assert sorted(p for p, *_ in bad) == ["['both']", "['embed']", "['heads']"]
  assert any("dimension 10 over mesh axes ('fsdp', 'tensor') of size 12" in why
             for *_, why in bad)
  with pytest.raises(errors.ConfigError, match=r"(?s)3 state arrays.*sharding_rules"):
    aot.check_divisible(tree, mesh)
  only_tensor = {"heads": tree["heads"]}
  with pytest.raises(errors.ConfigError,
                     match=r"mesh axes \['tensor'\] \(heads, mlp, vocab\)"):
    aot.check_divisible(only_tensor, mesh, aot.sharding.DEFAULT_RULES)
  aot.check_divisible({"ok": tree["ok"]}, mesh)


class _Device:
  def __init__(self, i, host):
    self.id, self.process_index = i, host


class _Sharding:
  """Rows of the batch each device holds: `blocks[i]` for device i, 4 per host."""

  def __init__(self, blocks, spec=("data",)):
    self.devices = [_Device(i, i // 4) for i in range(len(blocks))]
    self.blocks, self.spec = blocks, spec

  def devices_indices_map(self, shape):
    n = len(set(self.blocks))
    rows = shape[0] // n
    return {d: (slice(b * rows, (b + 1) * rows),) for d, b in zip(self.devices, self.blocks)}


def test_rows_per_host_and_local_shapes():
  c = _recipe(batch_size=64)
  sh = _Sharding(list(range(8)))  # 8 data shards, 2 hosts of 4
  out = aot.host_batch_layout(c, sh, sh.devices)
  assert out["hosts"] == 2 and out["per_host_batch"] == 32
  assert out["rows_contiguous_per_host"]
  assert out["host_shapes"]["image"] == [32, 224, 224, 3]
  assert out["global_shapes"]["text"] == [64, 77]
  # A second mesh axis of size 2 laid across the two hosts: each host's devices hold
  # every row, twice what it reads.
  sh = _Sharding([0, 1, 2, 3, 0, 1, 2, 3])
  with pytest.raises(errors.ConfigError, match=r"reads 32 rows.*hold 64 distinct rows"):
    aot.host_batch_layout(c, sh, sh.devices)


def test_batch_shapes_are_the_synthetic_batch_shapes():
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  c = _recipe("configs/demo.py", batch_size=4)
  real = benchmark.synthetic_batch(c)
  shapes = benchmark.abstract_batch(c)
  assert {k: (v.shape, v.dtype) for k, v in real.items()} == {
      k: (v.shape, np.dtype(v.dtype)) for k, v in shapes.items()}


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_the_error_names_the_install():
  with pytest.raises(aot.AotError, match=r"pip install -e \"\.\[tpu\]\""):
    aot.slice_devices("v5e:2x2")


# --- with the TPU compiler (make test-aot) --------------------------------------------

needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="needs libtpu: make test-aot")


def _tool(*args, timeout=900):
  return subprocess.run([sys.executable, "tools/aot_compile.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@needs_libtpu
@pytest.mark.parametrize("spec,extra", [
    ("configs/demo.py", []),
    # The pod recipes' layout: FSDP, scanned blocks (XLA's FLOPs then come from the
    # unrolled lowering), full remat.
    ("configs/clip_b16.py", ["--config.batch_size=64", "--config.mesh.data=1",
                             "--config.mesh.fsdp=-1", "--config.model.scan_layers=True",
                             "--config.model.remat=full"])])
def test_compiles_for_a_v5e_2x2_slice(spec, extra):
  proc = _tool(f"--config={spec}", "--topology=v5e:2x2", "--json", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["num_devices"] == 4 and r["device_kind"] == "TPU v5 lite" and r["hosts"] == 1
  m = r["memory"]
  assert m["fits"] and 0 < m["peak_bytes"] < m["hbm_bytes"] == 16e9
  assert m["temp_bytes"] > 0 and m["argument_bytes"] >= sum(m["state"].values())
  # Adam's two moments: the optimizer state is about twice the parameters.
  assert 1.8 < m["state"]["opt_state"] / m["state"]["params"] < 2.2
  assert 0.8 < r["flops"]["xla_over_analytic"] < 1.3
  assert r["collectives"], "4 devices share gradients: the program must communicate"
  assert r["host_data"]["host_shapes"]["image"][0] == r["global_batch"]  # one host
  assert r["compile_s"] > 0 and r["expected"]["step_time_s"] > 0
  if "fsdp=-1" in " ".join(extra):  # FSDP: a quarter of the parameters per device.
    assert r["mesh"]["fsdp"] == 4 and r["flops"]["xla_source"].startswith("unrolled")
    total = r["num_params"] * 4
    assert m["state"]["params"] < 0.3 * total


@needs_libtpu
def test_slice_hosts_and_rows_per_host():
  """v5e:4x4 is 16 chips on 4 hosts of 2x2; a batch over all 16 gives each host 1/4."""
  devices = aot.slice_devices("v5e:4x4")
  assert len(devices) == 16 and aot.hosts(devices) == {0: 4, 1: 4, 2: 4, 3: 4}
  assert aot.physical_dims(devices) == [4, 4]
  import jax  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((16,), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  out = aot.host_batch_layout(_recipe("configs/demo.py", batch_size=64), sh, devices)
  assert out["hosts"] == 4 and out["per_host_batch"] == 16
  assert out["host_shapes"]["text"][0] == 16


@needs_libtpu
def test_loss_memory_on_a_slice_follows_the_per_device_batch():
  proc = _tool("--config=configs/siglip_b16.py", "--topology=v5e:2x2",
               "--loss_batches=256,512", "--json", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  small, large = json.loads(proc.stdout.strip().splitlines()[-1])
  assert large["per_device_batch"] == 2 * small["per_device_batch"] == 128
  # Chunked SigLIP holds one [b, b] block at a time: the same at both batches. Local
  # CLIP holds the gathered [B, 768] embeddings (and gradients) and [b, B] logits.
  assert large["siglip_chunked"] <= 1.1 * small["siglip_chunked"] + 1e4
  assert small["clip_local"] < large["clip_local"] < (
      2 * 2 * 512 * 768 * 4 + 3 * 128 * 512 * 4)
  assert large["pair_matrix_bytes"] == 512 * 512 * 4


@needs_libtpu
def test_pod_scale_errors_come_before_compiling():
  proc = _tool("--config=configs/clip_b16.py", "--topology=v5e:16x16",
               "--config.batch_size=1000", timeout=300)
  assert proc.returncode == 1
  assert "multiple of 256" in proc.stderr and "Traceback" not in proc.stderr
  proc = _tool("--config=configs/clip_b16.py", "--topology=v5e:2x2",
               "--config.mesh.data=3", timeout=300)
  assert proc.returncode == 1 and "needs 3 devices" in proc.stderr
  # A mesh axis that is no product of the torus's axes (2 on v5p's 4x4x4).
  proc = _tool("--config=configs/clip_b16.py", "--topology=v5p:4x4x4",
               "--config.mesh.data=2", "--config.mesh.fsdp=-1", timeout=300)
  assert proc.returncode == 1 and "cannot be laid on this slice" in proc.stderr, (
      proc.stderr[-2000:])
  assert "--config.mesh.data=4 --config.mesh.fsdp=16" in proc.stderr


def test_physical_grid_and_a_mesh_that_fits_it():
  devs = [types.SimpleNamespace(coords=(x, y, z)) for x in range(4) for y in range(8)
          for z in range(8)]
  assert aot.physical_dims(devs) == [4, 8, 8]
  # data=2 is no product of 4, 8, 8: the suggestion keeps at least 2-way data.
  assert aot.suggest_mesh({"data": 2, "fsdp": 128, "tensor": 1}, [4, 8, 8]) == (
      "--config.mesh.data=4 --config.mesh.fsdp=64")
  assert aot.suggest_mesh({"data": 1, "fsdp": 256, "tensor": 1}, [16, 16]) == (
      "--config.mesh.data=1 --config.mesh.fsdp=256")
  flat = [types.SimpleNamespace(coords=(x, y, 0)) for x in range(16) for y in range(16)]
  assert aot.physical_dims(flat) == [16, 16]


# Each pod recipe at its slice: (recipe, chips, hosts, physical axes, published params).
POD_RECIPES = [
    ("configs/clip_l14.py", 256, 64, (16, 16), 428e6),          # v5e-256
    ("configs/clip_l14.py:res=336", 256, 64, (16, 16), 428e6),
    ("configs/siglip_so400m.py", 256, 64, (4, 8, 8), 878e6),    # v5p-512
    # vlp_jax's CoCa layout: one MLP per multimodal layer where open_clip's 638M
    # coca_ViT-L-14 has two (self- and cross-attention blocks): about 5% fewer.
    ("configs/coca_l14.py", 512, 128, (8, 8, 8), 605e6),        # v4-1024
    ("configs/clip_bigg14.py", 256, 64, (4, 8, 8), 2.54e9),     # v5p-512
]


def _products(dims):
  """Every product of a subset of the physical axes (the mesh sizes a torus takes)."""
  out = {1}
  for d in dims:
    out |= {p * d for p in out}
  return out


@pytest.mark.parametrize("spec,chips_,hosts_,dims,params", POD_RECIPES)
def test_pod_recipe_plans_hold_at_their_slice_size(spec, chips_, hosts_, dims, params):
  """Without the TPU compiler: the recipe's mesh fits the slice's chips and torus, its
  batch splits over the devices and hosts, every parameter axis divides over its mesh
  axes, and the model has the published size."""
  c = cli.load_config_file(spec)
  sizes = aot.check_mesh(c, chips_)
  assert all(v in _products(dims) for v in sizes.values()), sizes
  rules = aot.sharding.rules_from_config(c.sharding_rules)
  plan = aot.check_batch(c, sizes, rules, num_hosts=hosts_)
  assert plan.per_shard * chips_ * plan.accum_steps == c.batch_size
  leaves, mesh = aot.param_leaves(c, sizes)
  assert aot.indivisible_leaves(leaves, mesh) == []
  n = sum(int(np.prod(x.shape)) for x in
          jax.tree.leaves(leaves, is_leaf=lambda x: hasattr(x, "sharding")))
  assert abs(n / params - 1) < 0.03, n
  # The same model over all 256 / 512 chips as pure FSDP would not divide (1152 and
  # 1664 are not multiples of 256; 768 not of 512): the layout's data axis is needed.
  # `:runlocal` shrinks it to a CPU run on any device count.
  from vlp_jax import validation  # pylint: disable=g-import-not-at-top
  local = cli.load_config_file(spec.split(":")[0] + ":runlocal")
  validation.validate(local)
  assert local.mesh.data == -1 and local.data.source == "shapes"
  if sizes["data"] > 1:
    all_fsdp = {"data": 1, "fsdp": chips_, "tensor": 1}
    leaves, mesh = aot.param_leaves(c, all_fsdp)
    assert aot.indivisible_leaves(leaves, mesh)


@needs_libtpu
def test_two_slices_get_a_mesh_whose_data_axis_spans_them():
  """Multi-slice: jax.make_mesh refuses such devices; sharding.make_mesh builds the
  hybrid mesh (data over the slices' network) the trainer and the tool share."""
  proc = _tool("--config=configs/demo.py", "--topology=v5e:2x2", "--num_slices=2",
               "--json", "--config.mesh.data=2", "--config.mesh.fsdp=-1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["num_devices"] == 8 and r["hosts"] == 2 and r["num_slices"] == 2
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["memory"]["fits"]
  proc = _tool("--config=configs/demo.py", "--topology=v5e:2x2", "--num_slices=2",
               "--config.mesh.data=1", "--config.mesh.fsdp=-1", timeout=300)
  assert proc.returncode == 1 and "multiple of 2" in proc.stderr
