"""Zero-shot classification: class names x prompt templates, prompt ensembling.

Option `templates` (vlp_jax/data/templates.py): the user's own list of templates with
'{}', a built-in set ('clip80', 'simple', 'imagenet', 'shapes', or CLIP's set of a
dataset: 'cifar10', 'food101', ...) or a file; by default an imagefolder's
templates.txt, else the source kind's built-in set, else 'imagenet'.
Option `classnames` (vlp_jax/data/classnames/): () / 'dataset' (default: the source's
own names), 'auto' (the built-in set of a tfds: dataset, else the source's), a built-in
set ('imagenet', 'cifar10', ...), a file, or the names themselves.

Models with token embeddings (FILIP) are scored token-wise: `token_class_scores`.
"""
import re

import numpy as np
from absl import logging

from vlp_jax.data import classnames as classnames_lib
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


def token_class_scores(predict_fns, params, images, class_names, prompts_fn,
                       batch_size):
  """[N, C] FILIP zero-shot scores: each image's token-wise image->text score s^I
  with each prompt, averaged over the prompts of a class. FILIP ensembles prompts by
  averaging the final similarities, not the text embeddings."""
  prompts = [prompts_fn(name) for name in class_names]
  flat = [p for ps in prompts for p in ps]
  sizes = np.array([len(ps) for ps in prompts])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  texts = common.embed_text_tokens(predict_fns, params, flat, batch_size)
  per_class = lambda i2t, t2i: np.add.reduceat(i2t, starts, axis=1) / sizes
  return common.image_token_scores(predict_fns, params, images, batch_size, texts,
                                   reduce=per_class)


def check(cfg, where):
  templates_lib.check(cfg.templates, f"{where}.templates")
  classnames_lib.check(cfg.classnames, f"{where}.classnames")


@EVALUATORS.register("zeroshot", options={"templates": (), "classnames": ()},
                     check=check)
def zeroshot(predict_fns, params, cfg):
  """top-1 / top-5 accuracy of labelled eval images against prompt-ensembled classes."""
  ds, source = common.load_eval_set(cfg)
  where = f"config.evals.{cfg.get('name', cfg.type)}"
  names = classnames_lib.resolve(cfg.classnames, cfg.source, source,
                                 f"{where}.classnames")
  templates = templates_lib.resolve(cfg.templates, cfg.source, source,
                                    f"{where}.templates")
  logging.info("%s: %d classes from %s; %d prompt templates from %s.", where,
               len(names.names), names.origin, len(templates.templates),
               templates.origin)
  class_names = list(names.names)
  if all(re.fullmatch(r"n\d{8}", n) for n in class_names):
    logging.warning("%s: the class names are WordNet ids (e.g. '%s'); prompts need "
                    "words: set %s.classnames=imagenet (or 'auto').", where,
                    class_names[0], where)
  if common.scores_tokens(predict_fns):
    images, examples = common.load_images(ds)
    scores = token_class_scores(predict_fns, params, images, class_names,
                                templates.prompts, cfg.batch_size)
  else:
    classes = class_embeddings(predict_fns, params, class_names,
                               templates.prompts, cfg.batch_size)
    image_emb, examples = common.embed_images(predict_fns, params, ds, cfg.batch_size)
    scores = image_emb @ classes.T
  labels = np.array([e.get("label", -1) for e in examples])
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f"Zero-shot source '{cfg.source}' split '{cfg.split}' has no "
                     "labelled examples.")
  result = metrics.topk_accuracy(scores[keep], labels[keep], ks=(1, 5))
  result["num_examples"] = int(keep.sum())
  return result
