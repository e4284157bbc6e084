"""Caption decoding speed of a captioning recipe: uncached greedy (the decoder re-run
over the whole buffer each step), KV-cached greedy and cached beam search, timed in
one process on randomly initialised parameters; prints one JSON object.

    python tools/benchmark_decode.py --config=configs/coca_b16.py:runlocal
    python tools/benchmark_decode.py --config=configs/coca_b16.py --batch_size=8 \
        --beam_size=4 --repeats=3

Every caption runs to `max_len` (end tokens are ignored), so each method decodes
batch_size x (max_len - 1) caption tokens; `tokens_per_s` counts those (beam search
decodes beam_size hypotheses per caption token). Times include the image encoder
(once per batch, the same for every method); `speedup_vs_uncached` divides the
uncached greedy time by each method's.
"""
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe: configs/NAME.py[:arg].", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Tokens per caption with BOS (0: the "
                                "model's text context length).")
_BEAM = flags.DEFINE_integer("beam_size", 4, "Beam size of the beam-search timing.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per method (the median).")
_METHODS = flags.DEFINE_list("methods", "uncached,greedy,beam",
                             "Of uncached, greedy, beam, sample.")
flags.mark_flags_as_required(["config"])


def decoders(model, max_len, beam_size):
  """name -> jitted fn(params, images): every caption runs to max_len (end and pad
  ids -1: never produced)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax.models import generate, kv_decode  # pylint: disable=g-import-not-at-top
  ids = dict(bos_id=1, eos_id=-1, pad_id=-1)
  return {
      "uncached": jax.jit(lambda p, x: generate.greedy_generate(model, p, x, max_len,
                                                                **ids)),
      "greedy": jax.jit(lambda p, x: kv_decode.greedy(model, p, x, max_len, **ids)),
      "beam": jax.jit(lambda p, x: kv_decode.beam(
          model, p, x, max_len, beam_size=beam_size, length_penalty=0.6, **ids)),
      "sample": jax.jit(lambda p, x: kv_decode.sample(
          model, p, x, jax.random.key(0), max_len, top_p=0.9, **ids)),
  }


def time_fn(fn, params, images, repeats):
  """(compile (or compilation-cache load) + first call seconds, median seconds of
  `repeats` calls)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  fn(params, images).block_until_ready()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(params, images).block_until_ready()
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def run(config, batch_size, max_len, beam_size, repeats, methods):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from vlp_jax import compile_cache, models  # pylint: disable=g-import-not-at-top
  compile_cache.enable(config)  # A second benchmark of the same shapes loads them.
  model = models.build_model(config.model)
  context = config.model.text.context_length
  max_len = max_len or context
  size = config.data.image_size
  images = jax.random.normal(jax.random.key(1), (batch_size, size, size, 3), jnp.float32)
  batch = {"image": images, "text": jnp.zeros((batch_size, context), jnp.int32)}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
  fns = decoders(model, max_len, beam_size)
  tokens = batch_size * (max_len - 1)
  out = {"config": config.model.name, "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "batch_size": batch_size,
         "max_len": max_len, "beam_size": beam_size, "dtype": str(config.model.dtype),
         "methods": {}}
  for name in methods:
    first, seconds = time_fn(fns[name], params, images, repeats)
    out["methods"][name] = {"seconds": round(seconds, 4),
                            "tokens_per_s": round(tokens / seconds, 1),
                            "compile_and_first_s": round(first, 2)}
  if "uncached" in out["methods"]:
    base = out["methods"]["uncached"]["seconds"]
    for m in out["methods"].values():
      m["speedup_vs_uncached"] = round(base / m["seconds"], 2)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = set(_METHODS.value) - {"uncached", "greedy", "beam", "sample"}
  if unknown or _BATCH.value < 1 or _REPEATS.value < 1 or _BEAM.value < 1:
    raise app.UsageError(f"--methods {sorted(unknown)} unknown, or --batch_size / "
                         "--repeats / --beam_size < 1.")
  config = _CONFIG.value
  if config.model.name != "coca":
    raise app.UsageError(f"--config's model '{config.model.name}' does not decode "
                         "captions; use a captioning recipe (configs/coca_b16.py).")
  max_len = _MAX_LEN.value
  if max_len and not 2 <= max_len <= config.model.text.context_length:
    raise app.UsageError(f"--max_len must be in [2, {config.model.text.context_length}].")
  print(json.dumps(run(config, _BATCH.value, max_len, _BEAM.value, _REPEATS.value,
                       _METHODS.value), indent=1))


if __name__ == "__main__":
  app.run(main)
