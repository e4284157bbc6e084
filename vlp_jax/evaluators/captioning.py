"""Captioning: decoding, BLEU-4 and CIDEr-D against the reference captions.

Options: `log_examples` (how many (caption, reference) pairs are written to the log)
and the decoding (`models/generate.py`, KV-cached; defaults and ranges:
`decode_options.py`): `method` ('greedy', 'beam' or 'sample'), `beam_size` and
`length_penalty` (beam search; GNMT's ((5 + n) / 6) ** length_penalty divides the
log-probability of n tokens; beam_size 1 equals greedy only at length_penalty 0),
`top_p`, `temperature` (>= 0.001) and `seed` (nucleus sampling), `max_len` (tokens per
caption, BOS included; 0 = config.model.text.context_length, the most it can be).
Sampling draws batch i of the eval set with seed + i (modulo 2**31).
"""
import itertools

import numpy as np
from absl import logging

from vlp_jax import config as config_lib, decode_options, errors
from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS

METHODS = decode_options.METHODS
OPTION_RANGES = dict(
    log_examples=(True, lambda v: v >= 0, ">= 0",
                  "captions written to the log with their first reference"),
    **decode_options.RANGES)
DECODE_OPTIONS = decode_options.DEFAULTS


def check(cfg, where):
  config_lib.check_numbers(cfg, where, OPTION_RANGES)
  if cfg.method not in METHODS:
    raise errors.ConfigError(f"{where}.method={cfg.method!r} is not one of "
                             f"{list(METHODS)} (the decoding method).")


def check_max_len(entry, model_cfg, where):
  """`max_len` <= the model's text context length (the decoder's positions)."""
  max_len, context = entry.get("max_len", 0), model_cfg.text.context_length
  if max_len > context:
    raise errors.ConfigError(
        f"{where}.max_len={max_len} exceeds config.model.text.context_length="
        f"{context} (the decoder has that many positions): use at most {context}, or "
        "0 for the context length.")


@EVALUATORS.register("captioning", options=dict(log_examples=5, **DECODE_OPTIONS),
                     check=check)
def captioning(predict_fns, params, cfg):
  """BLEU-4, CIDEr-D and, where examples carry 'keywords', the keyword accuracy."""
  if "generate" not in predict_fns:
    raise ValueError("The captioning evaluator needs a model with a text decoder "
                     "(model.name='coca').")
  ds, _ = common.load_eval_set(cfg)
  examples = [ds[i] for i in range(len(ds))]
  images = np.stack([e["image"] for e in examples])
  options = {k: cfg[k] for k in DECODE_OPTIONS if k != "seed"}
  batches = itertools.count()  # Sampling: batch i draws with seed + i.

  def generate(params, images):
    return predict_fns["generate"](
        params, images, seed=decode_options.batch_seed(cfg.seed, next(batches)),
        where=f"config.evals.{cfg.get('name', 'captioning')}.", **options)
  tokens = common.run_padded(generate, params, images, cfg.batch_size)
  captions = [predict_fns["detokenize"](t) for t in tokens]
  refs = [e["text"] for e in examples]
  result = {"bleu4": metrics.bleu(captions, refs), "cider": metrics.cider_d(captions, refs)}
  if all("keywords" in e for e in examples):
    result["keyword_acc"] = metrics.keyword_accuracy(
        captions, [e["keywords"] for e in examples])
  for cap, ref in list(zip(captions, refs))[:cfg.log_examples]:
    logging.info("caption: %-45r reference: %r", cap, ref[0])
  return result
