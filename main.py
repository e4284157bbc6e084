"""vlp_jax entry point.

    python main.py --config=configs/demo.py --workdir=/tmp/demo [--config.a.b=value ...]
    python main.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval [--step=N] \
        [--eval_dir=DIR]

Eval mode evaluates checkpoint N (default: the newest) of the workdir or, when the
workdir has none, the parameters `config.init_from` names (an imported model), and
writes DIR/results.json (default WORKDIR/eval/step_N/); the run's metrics.jsonl is
never touched.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vlp_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe: configs/NAME.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, plots.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes if the workdir holds a checkpoint) or eval.")
_STEP = flags.DEFINE_integer("step", -1, "--mode=eval: the checkpoint step to evaluate "
                             "(-1: the newest good one).")
_EVAL_DIR = flags.DEFINE_string(
    "eval_dir", "", "--mode=eval: where results.json goes (default WORKDIR/eval/step_N, "
    "or WORKDIR/eval/init_from for config.init_from's parameters).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process: HOST:PORT of process 0 (not needed on "
    "TPU pod slices and SLURM, which are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 0, "Split the CPU into this many devices (to try meshes locally).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though the model keys of its "
    "saved config.json differ from this config's.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show the traceback of user errors (bad config, data path, "
    "workdir, checkpoint) too; also VLP_JAX_VERBOSE=1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MODE.value == "train" and (_STEP.value != -1 or _EVAL_DIR.value):
    raise app.UsageError("--step and --eval_dir only apply to --mode=eval.")
  from vlp_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    _main()
  except errors.UserError as e:
    if _VERBOSE.value or os.environ.get("VLP_JAX_VERBOSE", "") not in ("", "0"):
      raise
    # A problem the user can fix: its message, without a traceback.
    print(f"error: {e}\n(--verbose or VLP_JAX_VERBOSE=1 shows the traceback.)",
          file=sys.stderr, flush=True)
    sys.exit(1)


def _main():
  from vlp_jax import multihost  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  cli.quiet_third_party_logs()
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _NUM_CPU_DEVICES.value)
  if _MODE.value == "train":
    loop.run(_CONFIG.value, _WORKDIR.value,
             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  else:
    loop.evaluate(_CONFIG.value, _WORKDIR.value,
                  step=None if _STEP.value < 0 else _STEP.value,
                  eval_dir=_EVAL_DIR.value or None)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_config_check)
