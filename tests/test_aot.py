"""tools/aot_compile.py: TPU slice names, the checks made before compiling, and (where
the TPU compiler, libtpu, is installed: `make test-aot`) compiling the demo and
clip_b16 for a v5e:2x2 slice from this CPU host."""
import importlib.util
import json
import os
import subprocess
import sys
import types

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
  shapes = aot.batch_shapes(c)
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
    ("configs/clip_b16.py", ["--config.batch_size=64", "--config.mesh.data=1",
                             "--config.mesh.fsdp=-1"])])
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
  assert r["host_data"]["per_host_batch"] == r["global_batch"]
  assert r["compile_s"] > 0 and r["expected"]["step_time_s"] > 0
  if "fsdp=-1" in " ".join(extra):  # FSDP: a quarter of the parameters per device.
    assert r["mesh"]["fsdp"] == 4
    total = r["num_params"] * 4
    assert m["state"]["params"] < 0.3 * total


@needs_libtpu
def test_pod_scale_errors_come_before_compiling():
  proc = _tool("--config=configs/clip_b16.py", "--topology=v5e:16x16",
               "--config.batch_size=1000", timeout=300)
  assert proc.returncode == 1
  assert "multiple of 256" in proc.stderr and "Traceback" not in proc.stderr
  proc = _tool("--config=configs/clip_b16.py", "--topology=v5e:2x2",
               "--config.mesh.data=3", timeout=300)
  assert proc.returncode == 1 and "needs 3 devices" in proc.stderr
