"""Analytic model FLOPs per training sample, device peak FLOP/s, and MFU.

Counting convention (as open_clip's profile, PaLM's MFU and MaxText): matmuls only,
2 FLOPs per multiply-add, attention scores (QK^T) and values (AV) included over the
full (unmasked) sequence, training = 3 x forward (backward = 2 x forward), and no
credit for rematerialisation. Norms, softmax and elementwise ops are not counted.
"""
import functools
import time

import jax
import jax.numpy as jnp

from vlp_jax import models
from vlp_jax.perf import method_flops
# The shared primitives, re-exported: each model family adds them up itself.
from vlp_jax.models.macs import (  # pylint: disable=unused-import
    attention_macs, block_macs, image_tokens, logits_macs, pool_macs,
    token_projection_macs, token_similarity_macs)


def forward_macs(config, train: bool = True) -> dict:
  """Per-sample forward multiply-adds by part, as the model family `config.model.name`
  counts them (its `forward_macs`; two_tower and coca: image, text, decoder, heads,
  logits; with FILIP, 'heads' holds the per-token projections and 'logits' the
  token-wise similarity, `logits_macs`). A family without a count is a TypeError,
  never a guessed MFU."""
  return models.forward_macs(config, train)


def train_flops_per_sample(config, step=None) -> float:
  """Model FLOPs of one training sample: 3 x forward, 2 FLOPs per multiply-add, plus
  what extra views, the momentum teacher's pass and a masked pass add
  (`method_flops.extra_train_macs`, already weighted by passes). `step`: count only
  the objectives on at that step (None: all, the work of the last phase)."""
  return 2.0 * (3.0 * sum(forward_macs(config, train=True).values())
                + sum(method_flops.extra_train_macs(config, step).values()))


def tower_train_flops_per_sample(config, tower: str) -> float:
  """Model FLOPs of one sample through one tower alone ('image' or 'text': what the
  family's `embed_image` / `embed_text` computes, projection included, as its
  `tower_macs` counts it): 3 x forward, 2 FLOPs per multiply-add."""
  return 3.0 * 2.0 * models.tower_macs(config, tower, train=True)


def forward_gflops_by_part(config, train: bool = False) -> dict:
  return {k: 2.0 * v / 1e9 for k, v in forward_macs(config, train).items()}


# Dense peak FLOP/s per chip: (substring of device_kind, lowercase) -> (bf16, f32).
# f32 on GPUs is the TF32 tensor-core peak (XLA's default precision for f32 matmuls
# there); TPUs run f32 matmuls through bf16 passes, so both entries equal bf16 peak.
PEAK_FLOPS = (
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 494e12),
    ("h200", 989e12, 494e12),
    ("gh200", 989e12, 494e12),
    ("a100", 312e12, 156e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v5 lite", 197e12, 197e12),
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v6 lite", 918e12, 918e12),
    ("tpu v6e", 918e12, 918e12),
)


def table_peak_flops(device_kind: str, dtype: str = "bfloat16"):
  """Peak dense FLOP/s of one device of `device_kind` for `dtype`, or None if unknown."""
  kind = device_kind.lower()
  for key, bf16, f32 in PEAK_FLOPS:
    if key in kind:
      return f32 if dtype == "float32" else bf16
  return None


@functools.cache
def measure_matmul_peak(n: int = 1024, repeats: int = 10, device=None) -> float:
  """Best-of-`repeats` float32 n x n matmul FLOP/s on `device` (for CPUs); measured
  once per process, so every record of a run shares one peak."""
  device = device or jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(dtype: str = "bfloat16", device=None):
  """(peak FLOP/s per device, source): from the table, or measured on CPU/unknown."""
  device = device or jax.devices()[0]
  peak = table_peak_flops(device.device_kind, dtype)
  if peak is not None:
    return peak, "table"
  return measure_matmul_peak(device=device), "measured f32 matmul"


def xla_flops(compiled):
  """FLOPs of a compiled computation from XLA's cost analysis (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


class MfuMeter:
  """Turns a measured samples/s into `perf/tflops_per_device` and `perf/mfu`."""

  def __init__(self, config, mesh):
    from vlp_jax.objectives import combine  # pylint: disable=g-import-not-at-top
    device = mesh.devices.flat[0]
    self.num_devices = mesh.devices.size
    self.flops_per_sample = train_flops_per_sample(config)
    # Per-sample FLOPs of each phase (objectives that start late split training
    # into phases): [(first step, FLOPs)], counted once here, not at every log.
    starts = sorted({0} | {o.starts_at for o in combine.from_config(config)})
    self.phases = [(s, train_flops_per_sample(config, s)) for s in starts]
    self.peak, self.peak_source = peak_flops(config.model.dtype, device)

  def row(self, samples_per_sec: float, step=None) -> dict:
    """`step` (the last step of the measured interval): count the work of the
    objectives on then (objectives that start late skip theirs before)."""
    per_sample = self.flops_per_sample if step is None else [
        f for s, f in self.phases if s <= step - 1][-1]
    tflops = samples_per_sec * per_sample / self.num_devices / 1e12
    return {"perf/tflops_per_device": tflops, "perf/mfu": tflops * 1e12 / self.peak}
