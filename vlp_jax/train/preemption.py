"""Multi-host agreement on stopping: every process stops (and saves) at the same step.

A SIGTERM may reach only some processes of a job (or reach them at different steps);
a process that stopped alone would leave the others blocked in a collective. Every
`every` steps the processes all-gather their local stop flags and all stop if any
asked. On a single process this is free (no communication) and checked every step.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils


def should_stop(local_request, step: int, every: int = 1) -> bool:
  """Whether the run stops after `step` (identical on every process)."""
  if jax.process_count() == 1:
    return bool(local_request)
  if step % max(every, 1):
    return False
  flags = multihost_utils.process_allgather(np.int32(1 if local_request else 0))
  return bool(np.any(flags))
