"""Orbax (async) checkpoints of the train state together with the data-iterator state."""
import os

import grain
import orbax.checkpoint as ocp


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  """A CheckpointManager under `workdir/checkpoints`, keeping the newest few."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager, step: int, state, data_iter=None, force: bool = False):
  """Starts an async save of `state` (and the grain iterator's position)."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager, abstract_state, data_iter=None, step=None):
  """Restores (state, step) from `step` (default: latest) into `abstract_state`'s shardings.

  The data iterator, if given, is restored in place. Returns (None, None) when there
  is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None, None
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError) as e:
    raise ValueError(
        f"Checkpoint at step {step} in {manager.directory} does not match the model "
        f"of this config ({e}). Use a fresh --workdir, or restore with the config "
        "the checkpoint was written with.") from e
  return restored["state"], step
