"""Checks run before anything compiles: writable workdir, free space, config changes,
and the tokenizer against the text tower (`check_tokenizer`)."""
import json
import os
import shutil
import uuid

import jax
import numpy as np
from absl import logging

from vlp_jax import config as config_lib, errors

# Keys (or key prefixes) that change what a checkpoint holds or means: a saved config
# that differs here from the new one is an error unless the change is deliberate.
MODEL_KEYS = ("model.", "data.image_size", "data.tokenizer", "frozen")


def check_workdir(workdir: str, abstract_state=None, keep: int = 1, best: bool = False):
  """Creates `workdir` and its `checkpoints/` (and `checkpoints_best/` with `best`, i.e.
  a `best_metric`), test-writes a file in each, and raises `errors.WorkdirError` naming
  the directory and the cause if one is not writable (permission, full disk, quota) or
  the checkpoints' disk has less free space than one checkpoint; warns below `keep + 1`
  checkpoints."""
  if "://" in workdir:  # Remote file systems (gs://...) are checked by Orbax itself.
    return
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for path in [workdir, ckpt_dir] + ([os.path.join(workdir, "checkpoints_best")]
                                     if best else []):
    _check_writable(path, workdir)
  if abstract_state is None:
    return
  need = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))
  free = shutil.disk_usage(ckpt_dir).free  # Where checkpoints go (may be a mount).
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  if free < need:
    raise errors.WorkdirError(
        f"Only {gib(free)} free under {ckpt_dir} (--workdir={workdir}), but one "
        f"checkpoint needs about {gib(need)}; free space or choose another workdir.")
  if free < need * (keep + 1):
    logging.warning("Only %s free under %s: room for fewer than keep_checkpoints+1=%d "
                    "checkpoints of about %s each.", gib(free), ckpt_dir, keep + 1,
                    gib(need))


def write_probe(directory: str):
  """Writes, then removes, a uniquely named file in `directory` (raises OSError)."""
  probe = os.path.join(directory, f".write_test_{uuid.uuid4().hex}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
  finally:
    if os.path.exists(probe):
      os.remove(probe)


def _check_writable(path: str, workdir: str):
  """Creates `path` if missing and writes (then removes) a file in it."""
  try:
    os.makedirs(path, exist_ok=True)
    write_probe(path)
  except OSError as e:
    cause = (e.strerror or str(e)).lower()
    err = errors.WorkdirError(
        f"{path} is not writable ({cause}; --workdir={workdir}), so the run did not "
        "start. Make it writable by the user running the training (check its owner and "
        "mode, free space or quota), or choose another --workdir.")
    err.errno = e.errno
    raise err from None


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, new: dict, defaults: dict = None):
  """(model changes, other changes): lists of 'key: saved -> new'. A key the saved
  config lacks (written before the key existed) is unchanged when its new value is
  its value in `defaults` (the default config): a new option left off changes nothing."""
  a, b = _flatten(saved), _flatten(new)
  d = _flatten(defaults or {})
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  new_default = lambda k: k not in a and k in d and norm(b.get(k)) == norm(d[k])
  diffs = [k for k in sorted(set(a) | set(b))
           if norm(a.get(k)) != norm(b.get(k)) and not new_default(k)]
  fmt = lambda k: f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
  model = [fmt(k) for k in diffs if k.startswith(MODEL_KEYS)]
  other = [fmt(k) for k in diffs if not k.startswith(MODEL_KEYS)]
  return model, other


def check_config_change(workdir: str, new: dict, allow: bool):
  """Compares a resumed workdir's saved config.json with the new config: model changes
  are an error unless `allow`; other changes (schedule, logging, ...) a warning."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  defaults = json.loads(json.dumps(config_lib.to_dict(config_lib.default_config())))
  model, other = config_changes(saved, json.loads(json.dumps(new)), defaults)
  if model and not allow:
    raise errors.ConfigError(
        f"The config differs from the one {workdir} was trained with (config.json) in "
        f"model keys: {'; '.join(model)}. Use a fresh --workdir, the original config, "
        "or pass --allow_config_change if the change is deliberate.")
  if model or other:
    logging.warning("Resuming %s with a changed config: %s", workdir,
                    "; ".join(model + other))


# Text pools that find the tokens by pad id 0 (models/text.py `pool_features`).
PAD0_POOLS = ("eos", "mean")


def _flag(key, value):
  return f"--config.{key}={value}"


def _pad0_readers(m) -> list:
  """What of `config.model` `m` locates text padding by id 0 (models/text.py PAD_ID):
  [(what, fixable by model.text.pool / padding_mask overrides)]."""
  t = m.text
  if m.name == "m3ae":
    return [("M3AE, which masks padding by id 0 in its encoder, decoder and text loss",
             False)]
  if m.name == "coca" and m.get("coca_layout", "vlp_jax") == "vlp_jax":
    return [("CoCa's 'vlp_jax' layout, which pools at 'eos' and masks padding "
             "whatever model.text.pool / padding_mask say", False)]
  out = []
  if t.get("padding_mask", True):
    out.append(("model.text.padding_mask=True", True))
  if m.name != "coca" and t.pool in PAD0_POOLS:
    out.append((f"model.text.pool={t.pool!r}", True))
  if t.get("prefix_conditioning"):
    out.append(("model.text.prefix_conditioning", False))
  if m.get("token_embed_dim", 0) > 0:
    out.append(("FILIP's token-wise similarity, model.token_embed_dim > 0", False))
  return out


def check_tokenizer(config, tokenizer):
  """Raises `errors.ConfigError` naming the fix when `tokenizer` (of
  config.data.tokenizer) does not fit the model's text tower: more ids than
  model.text.vocab_size; a caption objective masking another pad id; pool 'argmax'
  (CLIP's: the highest id is EOS) with a tokenizer whose EOS is not its highest id; a
  tokenizer padding with a non-zero id (siglip:, some hf:) while the tower masks or
  pools by id 0, which would treat its padding as real tokens."""
  spec, m = config.data.tokenizer, config.model
  t, pad = m.text, tokenizer.pad_id
  if tokenizer.vocab_size > t.vocab_size:
    raise errors.ConfigError(
        f"Tokenizer '{spec}' has {tokenizer.vocab_size} ids but model.text.vocab_size "
        f"is {t.vocab_size}; raise the latter "
        f"({_flag('model.text.vocab_size', tokenizer.vocab_size)}).")
  caption_pad = config.objective_cfg.get("caption", {}).get("pad_id", 0)
  if "caption" in config.objectives and caption_pad != pad:
    raise errors.ConfigError(
        f"Tokenizer '{spec}' pads with id {pad} but the caption objective masks id "
        f"{caption_pad}; set {_flag('objective_cfg.caption.pad_id', pad)}.")
  pool, mask = ("eos", True) if pad == 0 else ("last", False)
  fix = f"{_flag('model.text.pool', pool)} {_flag('model.text.padding_mask', mask)}"
  eos, top = tokenizer.eos_id, tokenizer.vocab_size - 1
  if m.name != "coca" and t.pool == "argmax" and eos != top:
    has = "no EOS" if eos is None else f"EOS id {eos}"
    raise errors.ConfigError(
        "model.text.pool='argmax' pools at the highest token id, which must be the "
        f"tokenizer's EOS (as CLIP's 49407), but {_flag('data.tokenizer', spec)} has "
        f"{has} and its highest id is {top}. Pool at the last real token instead: "
        f"{fix}.")
  readers = _pad0_readers(m)
  if pad == 0 or not readers:
    return
  fixable = all(ok for _, ok in readers)
  raise errors.ConfigError(
      f"{_flag('data.tokenizer', spec)} pads with id {pad}, but the model finds text "
      f"padding by id 0 ({'; '.join(what for what, _ in readers)}), so this "
      "tokenizer's padding would count as real tokens. " +
      (f"Set {fix} (pool at the last position, as SigLIP; no key mask)." if fixable else
       "Use a tokenizer that pads with id 0 ('clip', 'bytes', 'sentencepiece:', or "
       "hf:...,pad=0)" + (f", or {_flag('model.coca_layout', 'open_clip')} "
                          f"{_flag('model.text.padding_mask', False)}"
                          if m.name == "coca" else "") + "."))
