"""Train-step benchmark: the trainer's jitted step, timed on synthetic or real batches.

Imports nothing from the data pipeline (grain) unless `with_data` is set, so it runs
where only jax/flax/optax are installed.
"""
import time

import jax
import numpy as np

from vlp_jax import flops as flops_lib
from vlp_jax import sharding
from vlp_jax.train.setup import TrainSetup


def synthetic_batch(config, seed: int = 0):
  """A host batch of the global batch size: random images and full-length token ids."""
  rng = np.random.default_rng(seed)
  s, length = config.data.image_size, config.model.text.context_length
  b = config.batch_size
  return {
      "image": rng.standard_normal((b, s, s, 3), np.float32),
      "text": rng.integers(1, config.model.text.vocab_size, (b, length), np.int32),
  }


def memory_stats(compiled, device):
  """Peak-memory estimates in bytes from XLA's memory analysis (and the allocator)."""
  out = {}
  try:
    m = compiled.memory_analysis()
    if m is not None:
      for key in ("argument_size_in_bytes", "output_size_in_bytes",
                  "temp_size_in_bytes", "alias_size_in_bytes",
                  "generated_code_size_in_bytes"):
        if hasattr(m, key):
          out[key] = int(getattr(m, key))
      out["peak_bytes_estimate"] = (out.get("argument_size_in_bytes", 0)
                                    + out.get("output_size_in_bytes", 0)
                                    + out.get("temp_size_in_bytes", 0)
                                    - out.get("alias_size_in_bytes", 0))
  except Exception:  # pylint: disable=broad-except  (backend without the analysis)
    pass
  try:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["allocator_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _data_batches(config, setup):
  from vlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import prefetch  # pylint: disable=g-import-not-at-top
  tokenizer = pipeline.make_tokenizer(config.data)
  it = iter(pipeline.train_dataset(config, tokenizer))
  host = (pipeline.split_bad_counts(b)[0] for b in it)
  return prefetch.DevicePrefetcher(
      host, lambda b: sharding.make_global_batch(b, setup.mesh, setup.rules),
      config.device_prefetch)


class StepBenchmark:
  """Compiles the train step for `config` once; `time(n)` times n more steps."""

  def __init__(self, config, with_data: bool = False, devices=None):
    self.config, self.with_data = config, with_data
    self.setup = TrainSetup(config, devices)
    self.device = self.setup.mesh.devices.flat[0]
    self.num_devices = self.setup.mesh.devices.size
    with self.setup.contexts()[0], self.setup.contexts()[1]:
      self.state = self.setup.create_state()
      if with_data:
        self.batches = _data_batches(config, self.setup)
        self.batch = next(self.batches)
      else:
        self.batch = sharding.make_global_batch(synthetic_batch(config), self.setup.mesh,
                                                self.setup.rules)
      t0 = time.perf_counter()
      self.compiled = self.setup.step_fn.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - t0
    self.loss = None

  def time(self, steps: int):
    """Runs `steps` steps, each waited for with block_until_ready; their seconds."""
    times = []
    with self.setup.contexts()[0], self.setup.contexts()[1]:
      for _ in range(steps):
        t0 = time.perf_counter()
        if self.with_data:
          self.batch = next(self.batches)
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        times.append(time.perf_counter() - t0)
    self.loss = float(metrics["loss"])
    return times

  def record(self, times) -> dict:
    """The benchmark record (see README, "Performance") for the measured `times`."""
    config, n_dev = self.config, self.num_devices
    times = np.asarray(times)
    step_s = float(np.median(times))
    samples_s = config.batch_size / step_s
    model_flops = flops_lib.train_flops_per_sample(config)
    xla = flops_lib.xla_flops(self.compiled)
    peak, peak_src = flops_lib.peak_flops(config.model.dtype, self.device)
    tflops = samples_s * model_flops / n_dev / 1e12
    return {
        "step_time_s": {"median": step_s, "min": float(times.min()),
                        "max": float(times.max()),
                        "p10": float(np.percentile(times, 10)),
                        "p90": float(np.percentile(times, 90)), "steps": int(times.size)},
        "samples_per_s": samples_s,
        "compile_s": self.compile_s,
        "model_gflops_per_sample": model_flops / 1e9,
        "model_gflops_per_sample_by_part_fwd": flops_lib.forward_gflops_by_part(config,
                                                                                 True),
        # XLA counts the per-device (SPMD-partitioned) program, elementwise ops included.
        "xla_gflops_per_step_per_device": None if xla is None else xla / 1e9,
        "xla_over_model_flops": None if xla is None else xla * n_dev / (
            model_flops * config.batch_size),
        **({"xla_flops_note": "scan_layers: XLA's cost analysis counts the scanned loop "
                              "body once, not once per layer"}
           if config.model.scan_layers else {}),
        "tflops_per_device": tflops,
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": peak_src,
        "mfu": tflops * 1e12 / peak,
        "memory": memory_stats(self.compiled, self.device),
        "device_kind": self.device.device_kind,
        "num_devices": n_dev,
        "platform": self.device.platform,
        "jax_version": jax.__version__,
        "batch_size": config.batch_size,
        "dtype": config.model.dtype,
        "with_data": self.with_data,
        "final_loss": self.loss,
    }


def run(config, steps: int = 20, warmup: int = 2, with_data: bool = False,
        devices=None) -> dict:
  """Compiles and times `steps` train steps (after `warmup`); the benchmark record."""
  bench = StepBenchmark(config, with_data, devices)
  bench.time(warmup)
  return bench.record(bench.time(steps))
