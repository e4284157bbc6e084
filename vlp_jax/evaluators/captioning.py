"""Captioning: greedy decoding, BLEU-4 and CIDEr-D against the reference captions.

Option `log_examples`: how many (caption, reference) pairs are written to the log.
Captions are decoded up to config.model.text.context_length tokens.
"""
import numpy as np
from absl import logging

from vlp_jax import config as config_lib
from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS


OPTION_RANGES = {
    "log_examples": (True, lambda v: v >= 0, ">= 0",
                     "captions written to the log with their first reference"),
}


def check(cfg, where):
  config_lib.check_numbers(cfg, where, OPTION_RANGES)


@EVALUATORS.register("captioning", options={"log_examples": 5}, check=check)
def captioning(predict_fns, params, cfg):
  """BLEU-4, CIDEr-D and, where examples carry 'keywords', the keyword accuracy."""
  if "generate" not in predict_fns:
    raise ValueError("The captioning evaluator needs a model with a text decoder "
                     "(model.name='coca').")
  ds, _ = common.load_eval_set(cfg)
  examples = [ds[i] for i in range(len(ds))]
  images = np.stack([e["image"] for e in examples])
  tokens = common.run_padded(predict_fns["generate"], params, images, cfg.batch_size)
  captions = [predict_fns["detokenize"](t) for t in tokens]
  refs = [e["text"] for e in examples]
  result = {"bleu4": metrics.bleu(captions, refs), "cider": metrics.cider_d(captions, refs)}
  if all("keywords" in e for e in examples):
    result["keyword_acc"] = metrics.keyword_accuracy(
        captions, [e["keywords"] for e in examples])
  for cap, ref in list(zip(captions, refs))[:cfg.log_examples]:
    logging.info("caption: %-45r reference: %r", cap, ref[0])
  return result
