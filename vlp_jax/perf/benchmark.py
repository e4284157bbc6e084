"""Train-step benchmark: the trainer's jitted step, timed on synthetic or real batches.

Imports nothing from the data pipeline (grain) unless `with_data` is set, so it runs
where only jax/flax/optax are installed.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.perf import flops as flops_lib
from vlp_jax.train.setup import TrainSetup


def synthetic_batch(config, seed: int = 0):
  """A host batch of the global batch size: random images and full-length token ids,
  and the extra views `config.data.views` / `text_views` ask for."""
  rng = np.random.default_rng(seed)
  s, length = config.data.image_size, config.model.text.context_length
  b = config.batch_size
  tokens = lambda: rng.integers(1, config.model.text.vocab_size, (b, length), np.int32)
  batch = {"image": rng.standard_normal((b, s, s, 3), np.float32), "text": tokens()}
  for name, v in (config.data.get("views") or {}).items():
    size = int(v.get("size", 0)) or s
    batch[f"views/{name}"] = rng.standard_normal(
        (b, int(v.get("count", 1)), size, size, 3), np.float32)
  for name in (config.data.get("text_views") or {}).keys():
    batch[f"text_views/{name}"] = tokens()
  return batch


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
  it = iter(pipeline.train_dataset(config, tokenizer, setup.batch))
  host = (pipeline.split_bad_counts(b)[0] for b in it)
  return prefetch.DevicePrefetcher(host, setup.global_batch, config.device_prefetch)


class StepBenchmark:
  """Compiles the train step for `config` once; `time(n)` times n more steps."""

  measured = "train step"  # what `time` runs, as the record names it

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
        self.batch = self.setup.global_batch(synthetic_batch(config))
      t0 = time.perf_counter()
      self.compiled = self._compile()
      self.compile_s = time.perf_counter() - t0
    self.loss = None

  def _compile(self):
    return self.setup.step_fn.lower(self.state, self.batch).compile()

  def _run_once(self):
    """One step; (what to wait for, the loss)."""
    if self.with_data:
      self.batch = next(self.batches)
    self.state, metrics = self.compiled(self.state, self.batch)
    return (self.state, metrics), metrics["loss"]

  def time(self, steps: int):
    """Runs `steps` steps, each waited for with block_until_ready; their seconds."""
    times = []
    with self.setup.contexts()[0], self.setup.contexts()[1]:
      for _ in range(steps):
        t0 = time.perf_counter()
        out, loss = self._run_once()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    self.loss = float(loss)
    return times

  def profile(self, logdir: str, steps: int = 3) -> dict:
    """Traces `steps` more steps into `logdir` (jax.profiler, perfetto JSON included),
    writes the compiled HLO (`hlo.txt`) and a per-op summary (`summary.md`) there;
    returns the summary's headline figures."""
    from vlp_jax.perf import trace_summary  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    hlo = self.compiled.as_text()
    with open(os.path.join(logdir, "hlo.txt"), "w") as f:
      f.write(hlo)
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for i in range(steps):
        with jax.profiler.StepTraceAnnotation("train", step_num=i):
          self.time(1)
    summary = trace_summary.summarize(
        trace_summary.load_events(trace_summary.find_trace(logdir)), hlo)
    with open(os.path.join(logdir, "summary.md"), "w") as f:
      f.write(trace_summary.markdown(summary) + "\n")
    return {"dir": logdir, **{k: summary[k] for k in (
        "steps", "timeline", "step_wall_ms", "busy_ms_per_step", "idle_fraction")},
            "categories": summary["categories"],
            "top_ops": [{k: o[k] for k in ("hlo_op", "kernel", "category", "ms_per_step")}
                        for o in summary["ops"][:10]]}

  def flops_per_sample(self) -> float:
    """The timed steps run from a fresh state (step 0): objectives that start later
    (registered `starts_at`) do not run there, so their work is not counted (time
    that phase with their start moved to 0, e.g. `start_fraction=0`). XLA's cost
    analysis of such a step counts its largest phase."""
    return flops_lib.train_flops_per_sample(self.config, step=0)

  def record(self, times) -> dict:
    """The benchmark record (see README, "Performance") for the measured `times`."""
    config, n_dev = self.config, self.num_devices
    times = np.asarray(times)
    step_s = float(np.median(times))
    samples_s = config.batch_size / step_s
    model_flops = self.flops_per_sample()
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
        "num_params": int(sum(x.size for x in jax.tree.leaves(self.state.params))),
        "final_loss": self.loss,
        "measured": self.measured,
    }


class TowerBenchmark(StepBenchmark):
  """Forward + backward of one tower alone: the gradient of sum(embedding^2) with
  respect to the parameters that tower uses; no other tower, loss or optimizer.
  Isolates a tower's speed (e.g. FLIP patch dropout, which only shortens the image
  tower); FLOPs are that tower's 3 x forward (with its projection head), as the model
  family counts it (`tower_macs`, models/interface.py)."""

  def __init__(self, config, tower: str = "image", devices=None):
    if tower not in _TOWER_METHODS:
      raise ValueError(f"tower must be one of {sorted(_TOWER_METHODS)}, got {tower!r}.")
    self.tower = tower
    self.measured = f"{tower} tower forward + backward"
    super().__init__(config, False, devices)

  def _compile(self):
    method, key = _TOWER_METHODS[self.tower]
    model = self.setup.model

    def objective(params, x, rng):
      emb, _ = model.apply({"params": params}, x, train=True, method=method,
                           rngs={"dropout": rng})
      return jnp.sum(jnp.square(emb.astype(jnp.float32)))

    args = (self.state.params, self.batch[key], jax.random.PRNGKey(0))
    used = used_leaves(objective, args[0], *args[1:])
    # Gradients of parameters the tower never reads would be zeros; not returning
    # them lets XLA drop them, so only the tower's own work is timed.
    fn = lambda *a: [g for g, u in zip(jax.tree.leaves(jax.grad(objective)(*a)), used)
                     if u]
    self.args = args
    return jax.jit(fn).lower(*args).compile()

  def _run_once(self):
    grads = self.compiled(*self.args)
    return grads, grads[0].ravel()[0]

  def flops_per_sample(self) -> float:
    return flops_lib.tower_train_flops_per_sample(self.config, self.tower)


_TOWER_METHODS = {"image": ("embed_image", "image"), "text": ("embed_text", "text")}


def used_leaves(fn, tree, *args) -> list:
  """For each leaf of `tree` (fn's first argument), whether fn's result depends on it
  (a backward liveness pass over fn's jaxpr: reads whose results are dropped, such as
  sharding constraints on unused parameters, do not count)."""
  jaxpr = jax.make_jaxpr(fn)(tree, *args).jaxpr
  live = {id(v) for v in jaxpr.outvars}
  for eqn in reversed(jaxpr.eqns):
    if any(id(v) in live for v in eqn.outvars):
      live |= {id(v) for v in eqn.invars}
  n = len(jax.tree.leaves(tree))
  return [id(v) in live for v in jaxpr.invars[:n]]


def run(config, steps: int = 20, warmup: int = 2, with_data: bool = False,
        devices=None, tower: str = "", profile_dir: str = "",
        profile_steps: int = 3) -> dict:
  """Compiles and times `steps` train steps (after `warmup`); the benchmark record.
  With `tower` ('image' or 'text'), times that tower's forward + backward alone. With
  `profile_dir`, then traces `profile_steps` more steps there (record["profile"])."""
  bench = (TowerBenchmark(config, tower, devices) if tower
           else StepBenchmark(config, with_data, devices))
  bench.time(warmup)
  record = bench.record(bench.time(steps))
  if profile_dir:
    record["profile"] = bench.profile(profile_dir, profile_steps)
  return record
