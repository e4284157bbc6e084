"""vlp_jax/perf/hlo_stats.py and tools/hlo_report.py: op counts and bytes from HLO text;
tools/gpu_perf.sh's runs and XLA flag names."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests import tool_modules
from vlp_jax.perf import hlo_stats


def _known(params, x):
  """2 dots, 2 transposes, 5 float32 -> bf16 converts (x, 2 params, tanh's output and
  the sum's result), 2 bf16 -> float32 (before tanh; the bf16 sum accumulates in
  float32), tanh, one sum."""
  bf16 = jnp.bfloat16
  a = x.astype(bf16) @ params["w1"].astype(bf16)                         # [8, 32]
  b = jnp.tanh(jnp.transpose(a).astype(jnp.float32))                    # [32, 8]
  return (jnp.transpose(b).astype(bf16) @ params["w2"].astype(bf16)).sum()  # [8, 4]


_ARGS = ({"w1": jnp.ones((16, 32)), "w2": jnp.ones((32, 4))}, jnp.ones((8, 16)))


@pytest.fixture(scope="module")
def known():
  lowered = jax.jit(_known).lower(*_ARGS)
  return hlo_stats.summarize(hlo_stats.lowered_hlo_text(lowered), batch=8)


def test_known_function_counts_exactly(known):
  kinds = {k: v["count"] for k, v in known["by_kind"].items()}
  assert kinds["matmul"] == 2 and kinds["transpose"] == 2
  assert known["converts"] == {"f32->bf16": 5, "bf16->f32": 2}
  # x is an argument but not a parameter: only w1's and w2's casts count.
  assert known["param_casts"]["count"] == 2
  assert known["param_casts"]["bytes"] == (16 * 32 + 32 * 4) * 2
  dots = [v for k, v in known["by_kind"].items() if k == "matmul"][0]
  assert dots["bytes"] == (8 * 32 + 8 * 4) * 2  # bf16 outputs
  assert known["kernels"] == sum(v["count"] for v in known["by_kind"].values())


def test_nested_calls_count_once_per_call_site():
  inner = jax.jit(lambda a, b: a @ b)

  def f(x, w):
    return inner(inner(x, w), w)

  text = hlo_stats.lowered_hlo_text(jax.jit(f).lower(jnp.ones((4, 4)), jnp.ones((4, 4))))
  assert len(re.findall(r" dot\(", text)) == 1  # one body, two call sites
  s = hlo_stats.summarize(text)
  assert s["by_kind"]["matmul"]["count"] == 2


def test_compiled_kernels_are_classified_by_their_contents():
  compiled = jax.jit(_known).lower(*_ARGS).compile()
  s = hlo_stats.summarize(compiled.as_text(), batch=8)
  assert s["by_kind"]["matmul"]["count"] == 2
  non_mm = sum(v["count"] for v in s["non_matmul_fusions"].values())
  fusions = [i for i, _ in hlo_stats.kernels(hlo_stats.parse(compiled.as_text()))
             if i.opcode == "fusion"]
  assert non_mm <= len(fusions) and s["kernels"] >= 2


def test_parse_shapes_and_metadata():
  text = "\n".join([
      "HloModule m",
      "",
      "ENTRY %main.1 (p: f32[2,3]) -> (bf16[2,3], f32[]) {",
      '  %p = f32[2,3]{1,0} parameter(0), metadata={op_name="params[\'w\']"}',
      '  %c = bf16[2,3]{1,0} convert(%p), metadata={op_name="jit(f)/convert_element_type"}',
      "  %z = f32[] constant(0)",
      "  ROOT %t = (bf16[2,3]{1,0}, f32[]) tuple(%c, %z)",
      "}"])
  m = hlo_stats.parse(text)
  c = m.instructions["c"]
  assert c.opcode == "convert" and c.operands == ["p"] and c.out_bytes == 12
  assert m.instructions["t"].shapes == [("bf16", (2, 3)), ("f32", ())]
  s = hlo_stats.summarize(text)
  assert s["kernels"] == 1 and s["param_casts"] == {"count": 1, "bytes": 12.0}


def _tiny_config():
  from configs import clip_b16  # pylint: disable=g-import-not-at-top
  config = clip_b16.get_config("runlocal")
  config.model.dtype, config.batch_size, config.evals = "bfloat16", 4, {}
  return config


@pytest.fixture(scope="module")
def tiny():
  """The tiny CLIP step's pre-optimisation HLO at batch 4 and 8 (lowered, not compiled)."""
  config = _tiny_config()
  out = {}
  for b in (4, 8):
    config.batch_size = b
    text = hlo_stats.lowered_hlo_text(hlo_stats.lower_train_step(config)[0])
    out[b] = (text, hlo_stats.summarize(text, batch=b))
  return out


def test_tiny_clip_step_matches_a_plain_count(tiny):
  text, pre = tiny[4]
  # An independent count: instruction lines by opcode over the whole text (this step's
  # nested jits hold no dot or transpose, so each runs once).
  plain = lambda op: len(re.findall(rf"^\s*(?:ROOT )?%\S+ = \S+ {op}\(", text, re.M))
  assert pre["by_kind"]["matmul"]["count"] == plain("dot") + plain("convolution") > 0
  assert pre["by_kind"]["transpose"]["count"] == plain("transpose") > 0
  assert sum(pre["converts"].values()) == plain("convert")


def test_roles_and_per_sample_bytes(tiny):
  pre, big = tiny[4][1], tiny[8][1]
  # Float32 master weights cast to bf16 (the tiny CLIP has 61 parameter arrays; the
  # LayerNorm scales and biases stay float32); the optimizer runs several ops per
  # array, and neither grows with the batch.
  assert 0 < pre["param_casts"]["count"] < 61
  assert pre["param_casts"]["count"] == big["param_casts"]["count"]
  assert pre["optimizer"]["kernels"] > 61
  per = hlo_stats.per_sample(pre, big, 4, 8)["by_role"]
  assert per["optimizer"] == 0.0 and per["layernorm"] > 0.0 and per["gelu"] > 0.0
  # The [B, B] logits of the CLIP loss, found at either batch.
  assert pre["pair_logits"]["count"] == big["pair_logits"]["count"] > 0


def test_markdown_names_the_parts(tiny):
  pre = tiny[4][1]
  report = {"config": "configs/clip_b16.py:runlocal", "overrides": [], "batch_size": 4,
            "per_device_batch": 4, "num_devices": 1, "platform": "cpu",
            "dtype": "bfloat16", "param_leaves": 61, "num_params": 1, "pre": pre,
            "pre_per_sample": hlo_stats.per_sample(pre, tiny[8][1], 4, 8),
            "at_batch": 256}
  text = hlo_stats.markdown(report)
  for part in ("Pre-optimisation HLO", "| optimizer |", "| layernorm |", "| matmul |",
               "top source lines", "Extrapolated to global batch 256"):
    assert part in text


@pytest.mark.slow  # ~6 s: a tool process on 2 CPU devices
def test_two_devices_count_at_the_global_batch():
  # Before SPMD partitioning the step's shapes are global, and the sharded loss's
  # logits are [per-device, global] in its shard_map body: both must be found.
  cmd = [sys.executable, os.path.join(tool_modules.REPO, "tools", "hlo_report.py"),
         "--config=configs/clip_b16.py:runlocal", "--config.batch_size=4",
         "--config.model.dtype=bfloat16", "--num_cpu_devices=2", "--config.mesh.data=2",
         "--nocompile", "--noper_sample", "--json"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       cwd=tool_modules.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["num_devices"] == 2 and record["per_device_batch"] == 2
  assert record["pre_batch"] == 4 and record["pre"]["pair_logits"]["count"] > 0


def test_extrapolation_counts_global_samples():
  summary = {"role_non_matmul": {"loss": 40.0, "optimizer": 7.0}}
  slope = {"role_non_matmul": {"loss": 10.0, "optimizer": 0.0}}
  # 4 global samples at 10 bytes each: nothing fixed; at 8 samples, twice the bytes.
  assert hlo_stats.extrapolate(summary, slope, 4, 8) == {"loss": 80.0, "optimizer": 7.0}


@pytest.mark.slow
def test_tool_report_compiles_and_counts():
  report = tool_modules.load("hlo_report").report(_tiny_config(), compile_step=True,
                                                  with_per_sample=False)
  assert report["compiled"]["by_kind"]["matmul"]["count"] > 0
  assert report["param_leaves"] == 61 and "Optimised HLO" in hlo_stats.markdown(
      dict(report, config="c", overrides=[]))


# tools/gpu_perf.sh: the one-command GPU pass (its runs, its XLA flag names).
_SCRIPT = os.path.join(tool_modules.REPO, "tools", "gpu_perf.sh")


def _script(*args, env=None, timeout=60):
  return subprocess.run(["bash", _SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, check=False)


def test_gpu_perf_dry_run_lists_every_run_against_a_baseline():
  out = _script("--dry_run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  names = [l.split(" ", 1)[0] for l in lines]
  assert names[:4] == ["clip_b256", "siglip_b256", "coca_b256", "clip_b512"]
  assert len(names) == len(set(names)) == 12
  assert all("tools/benchmark.py" in l and "--config.model.dtype=bfloat16" in l
             and "--config.compilation_cache_dir= " in l for l in lines)
  assert sum("--profile_dir=" in l for l in lines) == 2
  bases = {l.split("(vs ", 1)[1].split(")", 1)[0] for l in lines}
  assert bases <= set(names)


def test_gpu_perf_rejects_unknown_options_and_dry_run_writes_nothing(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path / "out"))
  for args in (("--cpu_smoke", "--dry_run_typo"), ("--cpu_smoke", "a", "b")):
    out = _script(*args, env=env)
    assert out.returncode == 2 and "gpu_perf.sh:" in out.stderr, args
  out = _script("--cpu_smoke", "--dry_run", env=env)
  assert out.returncode == 0 and "runlocal" in out.stdout
  assert not (tmp_path / "out").exists()


def test_gpu_perf_xla_flag_names_exist_in_the_pinned_jaxlib():
  flags_out = _script("--xla_flags")
  names = flags_out.stdout.split()
  assert len(names) == 4 and all(n.startswith("--xla_gpu_") for n in names)
  probe = [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"]
  run = lambda flags: subprocess.run(
      probe, capture_output=True, text=True, timeout=120, check=False,
      env=dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu"))
  ok = run(names)
  assert ok.returncode == 0, ok.stderr[-2000:]
  bad = run(names + ["--xla_gpu_enable_no_such_flag=true"])  # the check can fail
  assert bad.returncode != 0 and "no_such_flag" in bad.stderr


@pytest.mark.slow
def test_gpu_perf_cpu_smoke_writes_the_table(tmp_path):
  out_dir = tmp_path / "out"
  out = _script("--cpu_smoke", str(out_dir), timeout=3600,
                env=dict(os.environ, WORK_DIR=str(tmp_path / "work")))
  assert out.returncode == 0, out.stderr[-3000:]
  table = (out_dir / "table.md").read_text()
  assert "| clip_b256 | 8 |" in table and "1.00x (baseline)" in table
  assert "x vs clip_b256" in table and "failed" not in table
  # What the device tool brings back: a few flat files, the rest in one small archive.
  files = sorted(p.name for p in out_dir.iterdir())
  assert files == ["breakdown_b256.md", "breakdown_b512.md", "env.txt", "files.tar.gz",
                   "progress.log", "table.md"]
  assert (out_dir / "files.tar.gz").stat().st_size < 16e6
