"""What the compiled train step of a recipe asks for: ops, bytes and their sources.

    python tools/hlo_report.py --config=configs/clip_b16.py --config.batch_size=8
    python tools/hlo_report.py --config=configs/siglip_b16.py --config.batch_size=8 --json
    python tools/hlo_report.py --config=configs/clip_b16.py --config.batch_size=8 \\
        --num_cpu_devices=4 --config.mesh.data=4     # collectives on a 4-device mesh

Lowers the trainer's own jitted step (vlp_jax.perf.hlo_stats.lower_train_step: abstract
state, synthetic batch shapes; nothing runs) and counts, from the pre-optimisation HLO
(platform-independent) and the HLO this backend compiles (--nocompile skips it): ops
and output bytes by kind (matmul, elementwise, reduction, convert, copy, transpose,
collective) and by role (optimizer, LayerNorm, GELU, softmax, attention, loss, the
non-finite guard), float32 parameter casts, the optimizer's op count, [B, B] tensors
and the source lines with the most non-matmul bytes. The pre-optimisation HLO is also
lowered at twice the batch for bytes per sample (--noper_sample skips it). Prints
markdown; --json prints the record. --dump_dir writes both HLO texts.
"""
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: configs/NAME.py[:arg].",
                                          lock_config=False)
_JSON = flags.DEFINE_bool("json", False, "Print the record as JSON instead of markdown.")
_COMPILE = flags.DEFINE_bool("compile", True, "Also compile and count the optimised HLO.")
_PER_SAMPLE = flags.DEFINE_bool("per_sample", True,
                                "Lower at twice the batch too, for bytes per sample.")
_DUMP_DIR = flags.DEFINE_string("dump_dir", "", "Write pre.hlo.txt and compiled.hlo.txt "
                                "here.")
_AT_BATCH = flags.DEFINE_integer("at_batch", 256, "Extrapolate the pre-optimisation "
                                 "bytes (whole program, global shapes) to this global "
                                 "batch (with --per_sample).")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0,
                                        "Split the CPU into this many devices.")
flags.mark_flags_as_required(["config"])


def report(config, compile_step=True, with_per_sample=True, dump_dir=""):
  """The record tools/hlo_report.py prints (see hlo_stats.markdown)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vlp_jax.perf import hlo_stats  # pylint: disable=g-import-not-at-top
  config.evals = {}
  lowered, setup = hlo_stats.lower_train_step(config)
  n_dev, per_device = setup.mesh.devices.size, setup.batch.per_shard
  # The pre-optimisation HLO is the whole program before SPMD partitioning (global
  # shapes: its [B, B] logits and bytes are at the global batch); the compiled one is
  # one device's share (per-device shapes).
  pre_text = hlo_stats.lowered_hlo_text(lowered)
  leaves = jax.tree.leaves(setup.abstract.params)
  out = {"batch_size": config.batch_size, "per_device_batch": per_device,
         "num_devices": n_dev, "platform": setup.mesh.devices.flat[0].platform,
         "dtype": config.model.dtype, "param_leaves": len(leaves),
         "num_params": int(sum(x.size for x in leaves)),
         "pre_batch": config.batch_size,
         "pre": hlo_stats.summarize(pre_text, config.batch_size, local_batch=per_device)}
  if with_per_sample:
    big = config.copy_and_resolve_references()
    big.batch_size = 2 * config.batch_size
    big_pre = hlo_stats.summarize(hlo_stats.lowered_hlo_text(
        hlo_stats.lower_train_step(big)[0]), big.batch_size, local_batch=2 * per_device)
    out["pre_per_sample"] = hlo_stats.per_sample(out["pre"], big_pre, config.batch_size,
                                                 big.batch_size)
  compiled_text = ""
  if compile_step:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    compiled_text = compiled.as_text()
    out["compiled"] = hlo_stats.summarize(compiled_text, config.batch_size,
                                          local_batch=per_device)
  if dump_dir:
    os.makedirs(dump_dir, exist_ok=True)
    for name, text in (("pre.hlo.txt", pre_text), ("compiled.hlo.txt", compiled_text)):
      if text:
        with open(os.path.join(dump_dir, name), "w") as f:
          f.write(text)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  from vlp_jax.perf import hlo_stats  # pylint: disable=g-import-not-at-top
  record = report(_CONFIG.value, _COMPILE.value, _PER_SAMPLE.value, _DUMP_DIR.value)
  record["at_batch"] = _AT_BATCH.value
  record["config"] = next((a.split("=", 1)[1] for a in sys.argv
                           if a.startswith("--config=")), None)
  record["overrides"] = [a for a in sys.argv[1:] if a.startswith("--config.")]
  print(json.dumps(record) if _JSON.value else hlo_stats.markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_check)
