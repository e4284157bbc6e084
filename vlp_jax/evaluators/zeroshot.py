"""Zero-shot classification: class names x prompt templates, prompt ensembling.

Option `templates` (see `templates.py`): the user's own list of templates with '{}', a
built-in set ('imagenet', 'shapes') or a file; by default an imagefolder's
templates.txt, else the source kind's built-in set, else 'imagenet'.
"""
import numpy as np
from absl import logging

from vlp_jax.evaluators import common, metrics
from vlp_jax.evaluators import templates as templates_lib
from vlp_jax.registry import EVALUATORS


def class_embeddings(predict_fns, params, class_names, prompts_fn, batch_size):
  """Mean of each class's normalised prompt embeddings, renormalised -> [C, D]."""
  prompts = [prompts_fn(name) for name in class_names]
  flat = [p for ps in prompts for p in ps]
  emb = common.embed_texts(predict_fns, params, flat, batch_size)
  out, start = [], 0
  for ps in prompts:
    mean = emb[start:start + len(ps)].mean(axis=0)
    out.append(mean / np.linalg.norm(mean))
    start += len(ps)
  return np.stack(out)


def check(cfg, where):
  templates_lib.check(cfg.templates, f"{where}.templates")


@EVALUATORS.register("zeroshot", options={"templates": ()}, check=check)
def zeroshot(predict_fns, params, cfg):
  """top-1 / top-5 accuracy of labelled eval images against prompt-ensembled classes."""
  ds, source = common.load_eval_set(cfg)
  if not hasattr(source, "class_names"):
    raise ValueError(f"Zero-shot source '{cfg.source}' has no class names; use a "
                     "labelled source (e.g. 'shapes').")
  where = f"config.evals.{cfg.get('name', cfg.type)}.templates"
  templates = templates_lib.resolve(cfg.templates, cfg.source, source, where)
  logging.info("%s: %d prompt templates from %s.", where, len(templates.templates),
               templates.origin)
  classes = class_embeddings(predict_fns, params, source.class_names, templates.prompts,
                             cfg.batch_size)
  image_emb, examples = common.embed_images(predict_fns, params, ds, cfg.batch_size)
  labels = np.array([e.get("label", -1) for e in examples])
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f"Zero-shot source '{cfg.source}' split '{cfg.split}' has no "
                     "labelled examples.")
  result = metrics.topk_accuracy(image_emb[keep] @ classes.T, labels[keep], ks=(1, 5))
  result["num_examples"] = int(keep.sum())
  return result
