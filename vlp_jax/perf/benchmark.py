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


def batch_layout(config) -> dict:
  """{key: (shape, dtype)} of a global train batch: images, full-length token ids and
  the extra views `config.data.views` / `text_views` ask for."""
  s, length = config.data.image_size, config.model.text.context_length
  b = config.batch_size
  out = {"image": ((b, s, s, 3), np.float32), "text": ((b, length), np.int32)}
  for name, v in (config.data.get("views") or {}).items():
    size = int(v.get("size", 0)) or s
    out[f"views/{name}"] = ((b, int(v.get("count", 1)), size, size, 3), np.float32)
  for name in (config.data.get("text_views") or {}).keys():
    out[f"text_views/{name}"] = ((b, length), np.int32)
  return out


def abstract_batch(config, sharding=None) -> dict:
  """{key: jax.ShapeDtypeStruct} of `batch_layout` (with `sharding`): what lowering
  the step needs, nothing allocated."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_layout(config).items()}


def synthetic_batch(config, seed: int = 0):
  """A host batch of `batch_layout`: random images and token ids (1 .. vocab - 1)."""
  rng = np.random.default_rng(seed)
  vocab = config.model.text.vocab_size
  return {k: (rng.integers(1, vocab, shape, dtype) if dtype == np.int32
              else rng.standard_normal(shape, dtype))
          for k, (shape, dtype) in batch_layout(config).items()}


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


def host_batches(config, setup):
  """This process's host batches of the real input pipeline (bad-record counts popped)."""
  from vlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tokenizer = pipeline.make_tokenizer(config.data)
  it = iter(pipeline.train_dataset(config, tokenizer, setup.batch))
  return (pipeline.split_bad_counts(b)[0] for b in it)


def buffered_batches(config) -> int:
  """Batches the input stages hold ready while nothing consumes them (device prefetch;
  grain's read-ahead and output buffer, in each worker when there are workers): the
  steps that start a timed round of real data before the pipeline is back to its
  steady rate, so rounds skip them."""
  d = config.data
  return (config.device_prefetch + max(1, d.worker_count) * (max(1, d.prefetch) + 1)
          + 1)


def bottleneck(data: dict, tolerance: float = 1.05) -> str:
  """'none' (real steps within `tolerance` of synthetic ones), 'pipeline' (the host
  pipeline alone delivers fewer samples/s than the synthetic step consumes: more
  workers or cheaper decoding) or 'overlap' (it keeps up alone but not beside the
  step: the two compete for host cores, or copies are not hidden)."""
  if data["real_over_synthetic"] <= tolerance:
    return "none"
  if data["pipeline_samples_per_s"] < data["synthetic_samples_per_s"]:
    return "pipeline"
  return "overlap"


def cpu_seconds():
  """CPU seconds (user + system) used so far by this process and its live children
  (grain's worker processes); None without psutil."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  me = psutil.Process()
  total = 0.0
  for proc in [me] + me.children(recursive=True):
    try:
      t = proc.cpu_times()
      total += t.user + t.system
    except psutil.Error:  # a child that just exited
      pass
  return total


class StepBenchmark:
  """Compiles the train step for `config` once; `time(n)` times n more steps.

  With `with_data`, the step is compiled for the real pipeline's batches and
  `time(n, data=True)` feeds it the next ones (through the trainer's device
  prefetcher); `time(n, data=False)` reuses the first real batch, device-resident
  (the synthetic baseline of the same compiled step: input excluded)."""

  measured = "train step"  # what `time` runs, as the record names it

  def __init__(self, config, with_data: bool = False, devices=None):
    self.config, self.with_data = config, with_data
    self.setup = TrainSetup(config, devices)
    self.device = self.setup.mesh.devices.flat[0]
    self.num_devices = self.setup.mesh.devices.size
    with self.setup.contexts()[0], self.setup.contexts()[1]:
      self.state = self.setup.create_state()
      if with_data:
        from vlp_jax.train import prefetch  # pylint: disable=g-import-not-at-top
        self.batches = prefetch.DevicePrefetcher(host_batches(config, self.setup),
                                                 self.setup.global_batch,
                                                 config.device_prefetch)
        self.batch = next(self.batches)
      else:
        self.batch = self.setup.global_batch(synthetic_batch(config))
      t0 = time.perf_counter()
      self.compiled = self._compile()
      self.compile_s = time.perf_counter() - t0
    self.loss = None
    self.data = None  # with_data: the comparison `compare_data` measured

  def _compile(self):
    return self.setup.step_fn.lower(self.state, self.batch).compile()

  def _run_once(self, data=None):
    """One step; (what to wait for, the loss)."""
    data = self.with_data if data is None else data
    batch = next(self.batches) if data else self.batch
    self.state, metrics = self.compiled(self.state, batch)
    return (self.state, metrics), metrics["loss"]

  def time(self, steps: int, data=None):
    """Runs `steps` steps as the trainer does: step i+1 is fetched and dispatched
    before step i is waited for, so host work (the next batch, its device copy)
    overlaps the running step. Returns the seconds between successive step
    completions. `data` (default: `with_data`) feeds the real pipeline's batches."""
    times, pending = [], None
    if steps < 1:
      return times
    with self.setup.contexts()[0], self.setup.contexts()[1]:
      t_last = time.perf_counter()
      for _ in range(steps):
        out, loss = self._run_once(data)
        if pending is not None:
          jax.block_until_ready(pending)
          now = time.perf_counter()
          times.append(now - t_last)
          t_last = now
        pending = loss  # (the state of step i is donated to step i + 1)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t_last)
    self.loss = float(loss)
    return times

  def time_pipeline(self, batches: int):
    """Seconds per host batch of a second, independent pipeline iterator alone (no
    step, no device copy): what the input side delivers when nothing waits on it."""
    if getattr(self, "_pipeline", None) is None:
      self._pipeline = host_batches(self.config, self.setup)
    times = []
    for _ in range(batches):
      t0 = time.perf_counter()
      next(self._pipeline)
      times.append(time.perf_counter() - t0)
    return times

  def compare_data(self, steps: int, rounds: int = 3) -> dict:
    """Alternates `rounds` rounds of synthetic steps, real-data steps and the pipeline
    alone (`steps` timed of each per round, after skipping the batches the pipeline
    buffered meanwhile), so load drift hits all three; returns the comparison record
    (the real-data step times are the returned "real_times")."""
    skip = buffered_batches(self.config)
    synth, real, pipe, ratios, cpu = [], [], [], [], 0.0
    step_cpu = {False: 0.0, True: 0.0}  # CPU seconds of the timed steps, by `data`
    for _ in range(rounds):
      c0 = cpu_seconds()
      s = self.time(steps, data=False)
      c1 = cpu_seconds()
      self.time(skip, data=True)
      c2 = cpu_seconds()
      r = self.time(steps, data=True)
      if c0 is not None:
        step_cpu[False] += c1 - c0
        step_cpu[True] += cpu_seconds() - c2
      self.time_pipeline(skip)
      c0 = cpu_seconds()
      p = self.time_pipeline(steps)
      cpu += cpu_seconds() - c0 if c0 is not None else float("nan")
      synth, real, pipe = synth + s, real + r, pipe + p
      ratios.append(float(np.mean(r) / np.mean(s)))
    b, d = self.config.batch_size, self.config.data
    self.data = {
        "source": d.source if not d.mixture else list(d.mixture),
        "worker_count": int(d.worker_count), "prefetch": int(d.prefetch),
        "device_prefetch": int(self.config.device_prefetch),
        "normalize_on_device": bool(d.get("normalize_on_device", False)),
        "image_size": int(d.image_size), "rounds": rounds, "steps_per_round": steps,
        "skipped_per_round": skip,
        # Means: a stalled step costs its whole wait, so throughput is per mean step.
        "synthetic_step_s": float(np.mean(synth)),
        "real_step_s": float(np.mean(real)),
        "synthetic_samples_per_s": b / float(np.mean(synth)),
        "real_samples_per_s": b / float(np.mean(real)),
        # real step time / synthetic step time: the median of the rounds' ratios.
        "real_over_synthetic": float(np.median(ratios)),
        "round_ratios": ratios,
        # CPU seconds per step (process + grain workers; every core counted): the host
        # work real data adds, robust to other load on a shared machine (stalls on the
        # pipeline are not CPU time: see real_over_synthetic for them).
        "synthetic_cpu_s_per_step": step_cpu[False] / len(synth) if step_cpu[False] else None,
        "real_cpu_s_per_step": step_cpu[True] / len(real) if step_cpu[True] else None,
        "pipeline_batches_per_s": 1 / float(np.mean(pipe)),
        "pipeline_samples_per_s": b / float(np.mean(pipe)),
        # Per CPU-second of this process and its children (grain workers): the
        # pipeline's rate per core, nearly independent of other load on the machine.
        "pipeline_samples_per_cpu_s": (b * len(pipe) / cpu if np.isfinite(cpu) and cpu > 0
                                       else None),
        "cpu_count": os.cpu_count(),
    }
    self.data["bottleneck"] = bottleneck(self.data)
    return {"real_times": real, **self.data}

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
        # with_data: synthetic vs real-data step and the pipeline alone (`compare_data`).
        **({"data": self.data} if self.data else {}),
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

  def _run_once(self, data=None):
    del data  # synthetic only
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
        profile_steps: int = 3, rounds: int = 3) -> dict:
  """Compiles and times `steps` train steps (after `warmup`); the benchmark record.
  With `tower` ('image' or 'text'), times that tower's forward + backward alone. With
  `with_data`, alternates `rounds` rounds of synthetic steps, real-data steps and the
  pipeline alone (`steps` / `rounds` of each per round; record["data"]); the record's
  step times are the real-data ones. With `profile_dir`, then traces `profile_steps`
  more steps there (record["profile"])."""
  bench = (TowerBenchmark(config, tower, devices) if tower
           else StepBenchmark(config, with_data, devices))
  bench.time(warmup)
  if with_data and not tower:
    bench.time(warmup, data=False)
    per_round = max(1, -(-steps // max(1, rounds)))
    record = bench.record(bench.compare_data(per_round, max(1, rounds))["real_times"])
  else:
    record = bench.record(bench.time(steps))
  if profile_dir:
    record["profile"] = bench.profile(profile_dir, profile_steps)
  return record
