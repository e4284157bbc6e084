"""`config.init_from`: start a new run from another run's parameters (fine-tuning, LiT).

Only parameters are loaded (the optimizer starts fresh at step 0), and only when the
workdir has no checkpoint of its own: a resumed fine-tune continues from its own.

Parameters are named by their '/'-joined paths. A name is *selected* if it fully
matches an `include` regex and no `exclude` regex; unselected parameters keep their
fresh initialisation. Among selected names:
  loaded          in the checkpoint and the model with the same shape;
  missing         in the model only: an error unless matched by `allow_missing`;
  shape mismatch  other shape: an error unless matched by `allow_shape_mismatch`;
  unexpected      in the checkpoint only: an error (exclude them to proceed).
Allowed missing / mismatched parameters keep their initialisation.

With `format` ('open_clip', 'openai', 'hf_clip', 'hf_siglip', 'big_vision',
'open_clip_coca'),
`checkpoint` is another library's weights file (vlp_jax/interop/): it is converted to
the model's parameter tree (its param layout and image size: positions are resized)
and then selected by the same rules. The model's architecture options must match the
checkpoint's (`check_architecture`; the error lists the overrides). `load_params` is
the parameter-only entry point (evaluation of an imported model: `main.py --mode=eval`).
"""
import dataclasses

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vlp_jax import errors
from vlp_jax.train import freeze, teacher as teacher_lib


@dataclasses.dataclass
class Report:
  loaded: list
  not_selected: list
  missing: list
  shape_mismatch: list
  unexpected: list

  def summary(self) -> str:
    show = lambda xs: ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
    return "; ".join(f"{k.replace('_', ' ')} {len(v)}" + (f": {show(v)}" if v and
                                                           k != "loaded" else "")
                     for k, v in dataclasses.asdict(self).items())


def resolve(init_cfg, key="config.init_from"):
  """(checkpoints dir, step) of the checkpoint `init_cfg` (config key `key`) names;
  errors if absent."""
  if init_cfg.workdir:
    root = epath.Path(init_cfg.workdir) / "checkpoints"
    if not root.exists():
      raise FileNotFoundError(f"{key}.workdir={init_cfg.workdir!r} has no "
                              "checkpoints/ directory.")
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    step = steps[-1] if steps and init_cfg.step < 0 else init_cfg.step
    if step not in steps:
      raise FileNotFoundError(f"{key}: no checkpoint at step {step} in {root} "
                              f"(have {steps}).")
    return root, step
  path = epath.Path(init_cfg.checkpoint)
  if not path.name.isdigit() or not path.exists():
    raise FileNotFoundError(
        f"{key}.checkpoint={init_cfg.checkpoint!r} must be an existing "
        "checkpoint step directory such as WORKDIR/checkpoints/1000 (or "
        "WORKDIR/checkpoints_best/STEP).")
  return path.parent, int(path.name)


def _open(root):
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "params": ocp.PyTreeCheckpointHandler()}
  return ocp.CheckpointManager(root, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(
                                   read_only=True, create=False, save_interval_steps=0))


def compare(init_cfg, source_shapes: dict, target_shapes: dict) -> Report:
  """Classifies parameter names (see the module docstring)."""
  def selected(n):
    return freeze.matches(n, init_cfg.include) and not freeze.matches(n, init_cfg.exclude)
  report = Report([], [], [], [], [])
  for name, shape in target_shapes.items():
    if not selected(name):
      report.not_selected.append(name)
    elif name not in source_shapes:
      report.missing.append(name)
    elif tuple(source_shapes[name]) != tuple(shape):
      report.shape_mismatch.append(
          f"{name} {tuple(source_shapes[name])}->{tuple(shape)}")
    else:
      report.loaded.append(name)
  report.unexpected = [n for n in source_shapes if selected(n) and n not in target_shapes]
  return report


def check(init_cfg, report: Report, where: str, key: str = "config.init_from"):
  """Raises CheckpointError on the mismatches `init_cfg` (config key `key`) does not
  allow."""
  problems, hint = [], key.removeprefix("config.")
  bad_missing = [n for n in report.missing if not freeze.matches(n, init_cfg.allow_missing)]
  bad_shape = [s for s in report.shape_mismatch
               if not freeze.matches(s.split(" ")[0], init_cfg.allow_shape_mismatch)]
  if bad_missing:
    problems.append(f"missing from the checkpoint {len(bad_missing)}: {bad_missing[:8]} "
                    f"(allow with {hint}.allow_missing)")
  if bad_shape:
    problems.append(f"with other shapes {len(bad_shape)}: {bad_shape[:8]} (name "
                    f"checkpoint->model; allow with {hint}.allow_shape_mismatch)")
  if report.unexpected:
    problems.append(f"in the checkpoint but not the model {len(report.unexpected)}: "
                    f"{report.unexpected[:8]} (add them to {hint}.exclude)")
  if problems:
    raise errors.CheckpointError(
        f"{key} {where}: parameters " + " | ".join(problems) + ".")
  if not report.loaded:
    raise errors.CheckpointError(
        f"{key} {where}: no parameter selected by include="
        f"{list(init_cfg.include)} / exclude={list(init_cfg.exclude)} was found in the "
        "checkpoint.")


def load(init_cfg, params, tx, opt_shardings, model_cfg=None):
  """(params with the selected checkpoint values, fresh optimizer state, Report).

  `model_cfg` (config.model): checked against an imported checkpoint's architecture."""
  new_params, report = _load_params(init_cfg, params, model_cfg)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(new_params)
  return new_params, opt_state, report


def load_params(config, params):
  """`params` (the model's parameter tree: arrays, or ShapeDtypeStructs with
  shardings) with the values `config.init_from` selects, from a vlp_jax checkpoint or
  an imported one (`config.init_from.format`) -> (params, Report). For evaluating a
  model with no checkpoint of its own, and anything that needs no optimizer state."""
  return _load_params(config.init_from, params, config.model)


def _load_params(init_cfg, params, model_cfg=None, key="config.init_from"):
  if init_cfg.get("format", ""):
    return _load_converted(init_cfg, params, model_cfg, key)
  root, step = resolve(init_cfg, key)
  where = f"({root}/{step})"
  manager = _open(root)
  try:
    meta = manager.item_metadata(step)
    item = "state" if meta.get("state") is not None else "params"
    tree = meta[item]["params"] if item == "state" else meta[item]
    source = {k: tuple(v.shape) for k, v in freeze.named_leaves(tree).items()}
    target = freeze.named_leaves(params)
    report = compare(init_cfg, source, {k: v.shape for k, v in target.items()})
    check(init_cfg, report, where, key)
    loaded = set(report.loaded)

    def wanted(path, x):  # Restore only the loaded names, straight into their shardings.
      name = freeze.path_str(path)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) \
          if name in loaded else None
    abstract = jax.tree_util.tree_map_with_path(wanted, params)
    abstract = _prune(abstract)
    target_item = {"params": abstract} if item == "state" else abstract
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                       dtype=x.dtype), target_item)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        item: ocp.args.PyTreeRestore(item=target_item, restore_args=restore_args,
                                     partial_restore=True)}))[item]
  finally:
    manager.close()
  values = freeze.named_leaves(restored["params"] if item == "state" else restored)
  new_params = jax.tree_util.tree_map_with_path(
      lambda path, x: values.get(freeze.path_str(path), x), params)
  logging.info("%s %s: %s", key, where, report.summary())
  return new_params, report


# Architecture options an imported checkpoint fixes: (key of config.model, tower).
ARCH_KEYS = (("mlp_act", None), ("layer_norm_eps", None), ("image.ln_pre", "img"),
             ("coca_layout", None), ("decoder.pool_heads", "attn_pool"),
             ("image.pool", "img"), ("text.causal", "txt"), ("text.pool", "txt"),
             ("text.padding_mask", "txt"), ("use_logit_bias", "scale"),
             ("logit_scale_max", "scale"), ("proj_bias", None), ("image.proj", None),
             ("text.proj", None))


def _get(cfg, dotted):
  for k in dotted.split("."):
    cfg = cfg[k]
  return cfg


def check_architecture(model_cfg, ckpt_cfg, selected_names, where):
  """Raises errors.ConfigError listing the overrides when `model_cfg` computes another
  function than the imported checkpoint (`ckpt_cfg`) in the selected towers."""
  towers = {n.split("/")[0] for n in selected_names}
  diffs = []
  for key, tower in ARCH_KEYS:
    if tower is not None and tower not in towers:
      continue
    want, have = _get(ckpt_cfg, key), _get(model_cfg, key)
    same = abs(want - have) <= 1e-12 if isinstance(want, float) else want == have
    if key == "text.pool" and {want, have} <= {"argmax", "eos"}:
      same = True  # Both read CLIP's end token (argmax also where '!' (id 0) occurs).
    if key == "text.padding_mask" and not want and model_cfg.text.causal and \
        model_cfg.text.pool in ("argmax", "eos"):
      same = True  # A causal tower's end-token output never sees the padding.
    if not same:
      diffs.append(f"config.model.{key}={want!r}")
  if diffs:
    raise errors.ConfigError(
        f"config.init_from {where}: the model's architecture differs from the "
        f"checkpoint's; set {', '.join(diffs)} (or exclude those towers from "
        "init_from.include). tools/convert_weights.py --print_config prints the whole "
        "config.model of a checkpoint.")


def _layout_of(params):
  """{scan_layers, fused_qkv} of a parameter tree."""
  names = list(freeze.named_leaves(params))
  return {"scan_layers": any("/encoder/layers/" in n for n in names),
          "fused_qkv": any("/qkv_kernel" in n for n in names)}


def _load_converted(init_cfg, params, model_cfg, key="config.init_from"):
  """Another library's weights (`init_cfg.format`) converted and selected."""
  from vlp_jax import interop  # pylint: disable=import-outside-toplevel
  where = f"({init_cfg.format} {init_cfg.checkpoint})"
  fmt = interop.get(init_cfg.format)
  raw = fmt.read(init_cfg.checkpoint)
  # What the arrays cannot tell (open_clip's activation, head counts) is the run's.
  options = getattr(fmt, "options_from_model", None)
  ckpt_cfg = fmt.model_config(raw, model_cfg, **(
      options(model_cfg) if options and model_cfg is not None else {}))
  target = freeze.named_leaves(params)
  ckpt_cfg.update(_layout_of(params))
  size = fmt.native_image_size(raw)
  if "img/pos_embedding" in target:  # The model's grid (positions are resized to it).
    n = target["img/pos_embedding"].shape[1]
    size = int(round(n ** 0.5)) * int(ckpt_cfg.image.patch_size)
  if "txt/pos_embedding" in target:  # open_clip's CoCa: one more, the class token's.
    extra = int(ckpt_cfg.get("coca_layout", "") == "open_clip")
    ckpt_cfg.text.context_length = min(int(ckpt_cfg.text.context_length),
                                       int(target["txt/pos_embedding"].shape[1]) - extra)
  converted = freeze.named_leaves(fmt.to_params(raw, ckpt_cfg, size))
  report = compare(init_cfg, {k: v.shape for k, v in converted.items()},
                   {k: v.shape for k, v in target.items()})
  check(init_cfg, report, where, key)
  if model_cfg is not None:
    check_architecture(model_cfg, ckpt_cfg, report.loaded, where)
  loaded = set(report.loaded)

  def put(path, x):
    name = freeze.path_str(path)
    if name not in loaded:
      return x
    value = np.asarray(converted[name], dtype=x.dtype)
    sharding = getattr(x, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
  new_params = jax.tree_util.tree_map_with_path(put, params)
  logging.info("%s %s: %s", key, where, report.summary())
  return new_params, report


def _prune(tree):
  """Drops None leaves and then-empty dicts."""
  if isinstance(tree, dict):
    out = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None and v != {}}
  return tree


def apply(init_cfg, state, tx, state_shardings, model_cfg=None, teacher_cfg=None):
  """`state` with parameters from `init_cfg`'s checkpoint (if it names one);
  `model_cfg` (config.model) is checked against an imported checkpoint's. Then the
  teacher's from `teacher_cfg.init_from` (config.teacher), if it names one
  (`load_teacher`)."""
  if init_cfg.workdir or init_cfg.checkpoint:
    params, opt_state, _ = load(init_cfg, state.params, tx, state_shardings.opt_state,
                                model_cfg)
    # A momentum teacher starts from the loaded parameters (train/teacher.py).
    state = teacher_lib.reset(state.replace(params=params, opt_state=opt_state))
  return load_teacher(teacher_cfg, state, model_cfg)


def teacher_init_cfg(teacher_cfg):
  """`config.teacher.init_from` with `include` [] replaced by config.teacher.params
  (None when it names no checkpoint)."""
  init = None if teacher_cfg is None else teacher_cfg.get("init_from")
  if init is None or not (init.workdir or init.checkpoint):
    return None
  cfg = ml_collections.ConfigDict(init.to_dict() if hasattr(init, "to_dict") else init)
  cfg.include = list(init.include) or list(teacher_cfg.params)
  return cfg


def load_teacher(teacher_cfg, state, model_cfg=None):
  """`state` with its teacher's parameters (the selected sub-tree, config.teacher.params)
  loaded from `config.teacher.init_from`'s checkpoint by the rules of config.init_from
  (e.g. PRIOR's frozen reference model from its own run); unchanged when it names
  none. A teacher parameter absent from the checkpoint or of another shape is a
  CheckpointError naming it (and both shapes)."""
  cfg = teacher_init_cfg(teacher_cfg)
  if cfg is None:
    init = None if teacher_cfg is None else teacher_cfg.get("init_from")
    if init is not None and init.get("required", False):
      raise errors.ConfigError(
          "This config's teacher is a frozen model loaded from another run "
          "(config.teacher.init_from.required): set --config.teacher.init_from.workdir="
          "WORKDIR (configs/prior_coca_b16.py: the ':ref=WORKDIR' argument, the run of "
          "configs/prior_ref_lm_b16.py).")
    return state
  if state.teacher is None:
    raise errors.ConfigError("config.teacher.init_from names a checkpoint but the state "
                             "has no teacher: set config.teacher.params.")
  teacher, _ = _load_params(cfg, state.teacher, model_cfg, "config.teacher.init_from")
  return state.replace(teacher=teacher)

