"""Multi-process start-up: `jax.distributed` on TPU pods, SLURM and explicit clusters."""
import os

import jax
from absl import logging


def cluster_detected() -> bool:
  """True on a multi-task SLURM job or a multi-worker TPU VM slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, num_cpu_devices: int = 0):
  """Starts JAX's multi-process runtime before any device is touched.

  Explicit flags win (`num_processes > 1` needs a coordinator and a process id);
  otherwise a SLURM job or TPU pod slice is initialised automatically; a single
  process needs nothing. `num_cpu_devices` splits the CPU into that many devices
  (for trying meshes and multi-process runs on one machine).
  """
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  if num_processes > 1:
    if not coordinator_address or process_id < 0:
      raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT and "
                       "--process_id (0 .. num_processes-1).")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.warning("Process %d of %d: %d local / %d global devices.", jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:  # Process 0 alone reports progress.
    logging.set_verbosity(logging.WARNING)
