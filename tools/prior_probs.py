"""PRIOR's reference probabilities, precomputed: every caption of a source under a
trained reference language model (configs/prior_ref_lm_b16.py) -> a table that
config.data.ref_probs attaches to training batches as 'ref_probs' [B, L].

    .venv/bin/python tools/prior_probs.py --workdir=/tmp/prior_ref \
        --out=/tmp/prior_ref/ref_probs --source=jsonl:/data/laion/train.jsonl
    .venv/bin/python main.py --workdir=/tmp/prior \
        --config=configs/prior_coca_b16.py:precomputed=/tmp/prior_ref/ref_probs \
        --config.data.source=jsonl:/data/laion/train.jsonl

Every record of --source (default: the run's config.data.source, size and seed) is
read in order; each of its captions (cleaned as training cleans them) is tokenised
with the run's tokenizer and context length, and P_ref(t_i | t_<i) of each token is
computed from the reference's 'text_lm_logits' (its newest checkpoint, or --step).
The table holds each distinct tokenised caption once (vlp_jax/data/ref_probs.py), so
whichever caption of a multi-caption record a batch picks is found. Classification
sources (captions made from prompt templates) are not supported.
"""
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax import cli, errors  # pylint: disable=g-import-not-at-top

# Script: absl's FLAGS; imported (tests): private flags (no clash between tools).
_FLAG_VALUES, _define = cli.tool_flags(__name__)

_WORKDIR = _define(flags.DEFINE_string)("workdir", None, "The reference LM's run (config.json "
                               "+ checkpoints; configs/prior_ref_lm_b16.py).")
_OUT = _define(flags.DEFINE_string)("out", None, "Output table (a folder: meta.json + .npy "
                           "arrays, vlp_jax/data/ref_probs.py).")
_OVERWRITE = _define(flags.DEFINE_bool)("overwrite", False, "Replace an existing --out (a run "
                               "may train on it).")
_STEP = _define(flags.DEFINE_integer)("step", -1, "Checkpoint step (-1: the newest good one).")
_SOURCE = _define(flags.DEFINE_string)("source", "", "Source spec (default: the run's "
                              "config.data.source), e.g. jsonl:/d/a.jsonl.")
_SPLIT = _define(flags.DEFINE_string)("split", "train", "Split of the source.")
_SIZE = _define(flags.DEFINE_integer)("size", -1, "Records (0: all; -1: the run's "
                             "config.data.size).")
_SEED = _define(flags.DEFINE_integer)("seed", -1, "Data seed (-1: the run's config.seed; the "
                             "built-in shapes data depends on it).")
_BATCH = _define(flags.DEFINE_integer)("batch_size", 256, "Captions per forward pass.")


def captions_of(source):
  """Every cleaned caption of every readable record of `source`, in order."""
  from vlp_jax.data import decode, robust, sources  # pylint: disable=g-import-not-at-top
  if sources.is_classification(source):
    raise errors.ConfigError("tools/prior_probs.py: the source is classification data "
                             "(captions from prompt templates), which PRIOR's "
                             "precomputed path does not support; use the in-step "
                             "reference (configs/prior_coca_b16.py:ref=...).")
  out, bad = [], 0
  for i in range(len(source)):
    element = source[i]
    try:
      if robust.is_bad(element):
        raise ValueError(element["_bad"])
      out.extend(decode.clean_captions(element.get("text", [])))
    except (decode.BadRecord, ValueError):
      bad += 1
  if bad:
    logging.warning("Skipped %d unreadable records.", bad)
  return out


def reference_fn(workdir: str, step=None):
  """(config, tokens [N, L] -> probs [N, L]): the reference run's per-token
  P_ref(tokens[:, i] | tokens[:, <i]) (1.0 at i = 0 and at padding)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlp_jax.objectives import prior  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import saved_config  # pylint: disable=g-import-not-at-top
  config = saved_config.load(workdir, "the workdir of the reference run "
                             "(configs/prior_ref_lm_b16.py)")
  exp, params, got, where = saved_config.load_experiment(config, workdir, step)
  logging.info("Reference probabilities from %s (step %d).", where, got)

  # The reference's padding id, as its 'text_lm' objective masks it (default 0, the
  # id every built-in tokenizer pads with).
  pad_id = int((config.get("objective_cfg", {}).get("text_lm") or {}).get("pad_id", 0))

  @jax.jit
  def probs(p, tokens):
    logits = exp.model.apply({"params": p}, {"text": tokens})["text_lm_logits"]
    pr = prior.target_probs(logits, tokens)
    real = tokens[:, 1:] != pad_id
    return jnp.concatenate([jnp.ones_like(pr[:, :1]), jnp.where(real, pr, 1.0)], 1)

  return config, lambda tokens: np.asarray(probs(params, jnp.asarray(tokens)))


def compute(workdir: str, out: str, source_spec: str = "", split: str = "train",
            size: int = -1, seed: int = -1, step=None, batch_size: int = 256,
            overwrite: bool = False) -> dict:
  """Writes the table of `source_spec` (default the run's) to `out` (ConfigError if
  it exists, unless `overwrite`); -> summary."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import ref_probs, robust, sources, tokenizers  # pylint: disable=g-import-not-at-top
  ref_probs.check_writable(out, overwrite)  # Before loading anything.
  config, fn = reference_fn(workdir, step)
  d = config.data
  spec = source_spec or d.source
  source = robust.SafeSource(sources.make_source(
      spec, split, d.size if size < 0 else size, config.seed if seed < 0 else seed,
      d.image_size), spec)
  length = int(config.model.text.context_length)
  caps = captions_of(source)
  if not caps:
    raise errors.DataError(f"Source '{spec}' ({split}) has no readable captions.")
  tokens = np.unique(tokenizers.get_tokenizer(d.tokenizer).tokenize(caps, length), axis=0)
  probs = np.ones(tokens.shape, np.float32)
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    padded = np.zeros((batch_size, length), np.int32)  # One compiled shape.
    padded[:len(chunk)] = chunk
    probs[start:start + len(chunk)] = fn(padded)[:len(chunk)]
  ref_probs.save(out, tokens, probs, d.tokenizer, length, overwrite)
  summary = {"captions": len(caps), "distinct": int(len(tokens)), "out": out,
             "tokenizer": d.tokenizer, "context_length": length}
  logging.info("%s", summary)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    s = compute(_WORKDIR.value, _OUT.value, _SOURCE.value, _SPLIT.value, _SIZE.value,
                _SEED.value, None if _STEP.value < 0 else _STEP.value, _BATCH.value,
                _OVERWRITE.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"{s['distinct']} distinct captions ({s['captions']} in all) -> {s['out']}: "
        f"--config.data.ref_probs={s['out']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"], flag_values=_FLAG_VALUES)
  app.run(main)
