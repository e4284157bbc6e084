"""Orbax (async) checkpoints of the train state together with the data-iterator state."""
import os

import grain
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  """A CheckpointManager under `workdir/checkpoints`, keeping the newest few."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def _param_shapes(params):
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def check_compatible(manager, step: int, abstract_state):
  """Raises ValueError listing missing / unexpected / reshaped parameters, if any."""
  saved = _param_shapes(manager.item_metadata(step)["state"]["params"])
  wanted = _param_shapes(abstract_state.params)
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  reshaped = [f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
              for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if missing or unexpected or reshaped:
    show = lambda xs: "; ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
    parts = [f"{name} {len(xs)}: {show(xs)}" for name, xs in (
        ("missing from the checkpoint", missing), ("unexpected in the checkpoint",
                                                   unexpected),
        ("with other shapes", reshaped)) if xs]
    raise ValueError(
        f"Checkpoint at step {step} in {manager.directory} does not match the model of "
        f"this config. Parameters {' | '.join(parts)}. Use a fresh --workdir, or the "
        f"config the checkpoint was written with.{layout_hint(missing, unexpected)}")


def layout_hint(missing, unexpected) -> str:
  """Names the speed switch that changes the param tree, when that explains a mismatch."""
  scanned = lambda keys: any("'layers']['block']" in k for k in keys)
  unrolled = lambda keys: any("'block_0']" in k for k in keys)
  fused = lambda keys: any("qkv_kernel" in k for k in keys)
  hints = []
  if (scanned(missing) and unrolled(unexpected)) or (
      unrolled(missing) and scanned(unexpected)):
    hints.append("config.model.scan_layers differs from the checkpoint's (scanned "
                 "blocks are stacked under 'layers/block'; unrolled ones are "
                 "'block_<i>'): set it as when the checkpoint was written, or convert "
                 "the params with vlp_jax.models.convert.stack_blocks/unstack_blocks")
  if fused(missing) != fused(unexpected):
    hints.append("config.model.fused_qkv differs from the checkpoint's (fused: "
                 "'qkv_kernel'/'qv_bias'; separate: 'query'/'key'/'value'); set it as "
                 "when the checkpoint was written (vlp_jax.models.convert.fuse_qkv "
                 "converts separate to fused)")
  return "".join(f" Likely cause: {h}." for h in hints)


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
  check_compatible(manager, step, abstract_state)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step
