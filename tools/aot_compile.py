"""Compile a recipe's train step for a TPU slice from this host, with no TPU.

    pip install -e ".[tpu]"        # the TPU compiler (libtpu); any host, CPU included
    python tools/aot_compile.py --config=configs/clip_b16.py --topology=v5e:2x2 \\
        --config.batch_size=256
    python tools/aot_compile.py --config=configs/clip_l14.py --topology=v5p-512 --json

Builds the trainer's own state, shardings and jitted step (vlp_jax.train.setup.
TrainSetup, as main.py) over the slice's devices (`jax.experimental.topologies`),
checks what only fails at slice size before compiling (mesh against device count,
batch against data-parallel devices and hosts, parameter axes against mesh axes, batch
rows per host), then compiles it and prints one record: per-device parameter,
optimizer-state, argument, output, temporary (activations) and peak bytes against the
chip's HBM; XLA's FLOPs per device per step against the analytic count; the compiled
program's collectives; each host's batch and make_array_from_process_local_data shapes;
the step time at --mfu; compile time. Topologies: GENERATION:SHAPE (v5e:16x16,
v5p:4x8x8, v4:8x8x8, v6e:16x16) or Cloud accelerator types (v5litepod-256, v5p-512,
v4-1024); --num_slices=K for K slices (multi-slice). Exit status 1 with one message
for a plan that cannot work.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.perf import chips  # pylint: disable=g-import-not-at-top,wrong-import-position

# This host has no TPU: jax runs on the CPU; the slice is only compiled for.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
chips.quiet_tpu_runtime()

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from vlp_jax import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: configs/NAME.py[:arg].",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v5e:16x16, "
                                "v5p-512, v4-1024.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Several such slices joined by the "
                                "data-center network (multi-slice): config.mesh.data "
                                "spans them.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation for the expected step time.")
_JSON = flags.DEFINE_bool("json", False, "Print the record as JSON instead of markdown.")
_DUMP = flags.DEFINE_string("dump_hlo", "", "Write the compiled per-device HLO here.")
_LOSS_BATCHES = flags.DEFINE_list(
    "loss_batches", [], "Instead of the step: compile the contrastive losses alone "
    "(dense, local CLIP, chunked SigLIP, FILIP ring) at these global batches, with the "
    "recipe's embedding width, and print their temporary bytes per device.")
flags.mark_flags_as_required(["config", "topology"])


def _gb(x):
  return "?" if x is None else f"{x / 1e9:,.2f}"


def _flop(x):
  if x is None:
    return "?"
  return f"{x / 1e12:,.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"


def markdown(r: dict) -> str:
  """The record as a short markdown report."""
  m, f = r["memory"], r["flops"]
  lines = [
      f"### {r['config']} on {r['topology']}"
      + (f" x {r['num_slices']} slices" if r.get("num_slices", 1) > 1 else "")
      + f" {' '.join(r['overrides'])}".rstrip(), "",
      f"{r['num_devices']} x {r['device_kind']} on {r['hosts']} hosts, mesh "
      f"{r['mesh']}; {r['num_params'] / 1e6:,.1f}M parameters, {r['dtype']}; global "
      f"batch {r['global_batch']:,} ({r['per_device_batch']} per device, "
      f"{r['host_data']['per_host_batch']} per host); compiled in {r['compile_s']:.1f} s.",
      "", "| per device | GB |", "|---|---|"]
  for name, value in m["state"].items():
    lines.append(f"| {name} | {_gb(value)} |")
  lines += [f"| arguments (state + batch) | {_gb(m['argument_bytes'])} |",
            f"| temporaries (activations, workspace) | {_gb(m['temp_bytes'])} |",
            f"| outputs not aliased to donated inputs | "
            f"{_gb(m['output_bytes'] - m['alias_bytes'])} |",
            f"| **peak** | **{_gb(m['peak_bytes'])}** |",
            f"| HBM | {_gb(m['hbm_bytes'])} |", "",
            f"Fits: **{m['fits']}** ({(m['hbm_fraction'] or 0) * 100:.0f}% of HBM)"
            + (f"; {m['warning']}" if m["warning"] else "") + ".", ""]
  ratio = f["xla_over_analytic"]
  lines.append(f"FLOPs per device per step: XLA {_flop(f['xla_per_device'])}, "
               f"analytic {_flop(f['analytic_per_device'])}"
               + (f" (ratio {ratio:.2f})." if ratio else "."))
  if "expected" in r:
    e = r["expected"]
    lines.append(f"At {e['mfu']:.0%} MFU: {e['step_time_s']:.3f} s per step, "
                 f"{e['samples_per_s']:,.0f} samples/s.")
  lines += ["", "| collective | count | MB |", "|---|---|---|"]
  lines += [f"| {k} | {v['count']} | {v['bytes'] / 1e6:,.1f} |"
            for k, v in r["collectives"].items()] or ["| none | 0 | 0 |"]
  return "\n".join(lines)


def loss_markdown(rows, topology: str, dim: int) -> str:
  """--loss_batches' table: temporary MB per device of each loss + gradient."""
  names = [k for k in rows[0] if k not in ("batch", "pair_matrix_bytes",
                                           "per_device_batch")]
  lines = [f"### Contrastive losses on {topology}, embeddings {dim} wide: temporary MB "
           "per device (loss + gradient)", "",
           "| global batch | per device | " + " | ".join(names) + " | one [B, B] f32 |",
           "|---" * (len(names) + 3) + "|"]
  for r in rows:
    lines.append(f"| {r['batch']:,} | {r['per_device_batch']} | " + " | ".join(
        f"{r[n] / 1e6:,.1f}" for n in names) + f" | {r['pair_matrix_bytes'] / 1e6:,.0f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vlp_jax.perf import aot  # pylint: disable=g-import-not-at-top
  try:
    devices = aot.slice_devices(_TOPOLOGY.value, _SLICES.value)
    if _LOSS_BATCHES.value:
      from vlp_jax.perf import aot_losses  # pylint: disable=g-import-not-at-top
      dim = _CONFIG.value.model.embed_dim
      rows = aot_losses.loss_memory_table(
          devices, [int(b) for b in _LOSS_BATCHES.value], dim,
          token_dim=_CONFIG.value.model.get("token_embed_dim", 0))
      print(json.dumps(rows) if _JSON.value else loss_markdown(rows, _TOPOLOGY.value, dim))
      return
    record = aot.compile_report(_CONFIG.value, devices, mfu=_MFU.value,
                                dump_hlo=_DUMP.value)
  except errors.UserError as e:
    if _JSON.value and getattr(e, "record", None):  # DoesNotFit: the plan's facts
      print(json.dumps(dict(e.record, memory={"fits": False}, error=str(e))))
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  record["topology"] = _TOPOLOGY.value
  record["num_slices"] = _SLICES.value
  record["config"] = next((a.split("=", 1)[1] for a in sys.argv
                           if a.startswith("--config=")), None)
  record["overrides"] = [a for a in sys.argv[1:] if a.startswith("--config.")]
  print(json.dumps(record) if _JSON.value else markdown(record))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_check)
