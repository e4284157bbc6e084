"""Zero-shot classification: class names x prompt templates, prompt ensembling.

Option `templates` (vlp_jax/data/templates.py): the user's own list of templates with
'{}', a built-in set ('clip80', 'simple', 'imagenet', 'shapes', or CLIP's set of a
dataset: 'cifar10', 'food101', ...) or a file; by default an imagefolder's
templates.txt, else the source kind's built-in set, else 'imagenet'.
Option `classnames` (vlp_jax/data/classnames/): () / 'dataset' (default: the source's
own names), 'auto' (the built-in set of a tfds: dataset, else the source's), a built-in
set ('imagenet', 'cifar10', ...), a file, or the names themselves.
Option `class_subset` ('' = all classes): 'imagenet_a' / 'imagenet_r' scores only
those datasets' 200 ImageNet classes (CLIP's 200-way protocol; their TFDS labels are
ImageNet's 1,000), `classnames.imagenet.SUBSETS`.

Models with token embeddings (FILIP) are scored token-wise: `token_class_scores`.
"""
import contextlib
import re

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from vlp_jax import errors
from vlp_jax.data import classnames as classnames_lib
from vlp_jax.data.classnames import imagenet as imagenet_names
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


def class_scores(predict_fns, params, ds, class_names, prompts_fn, batch_size):
  """(scores [N, C], examples) of the images of `ds` against the classes: cosine with
  the prompt-ensembled class embeddings, or FILIP's token-wise scores."""
  if common.scores_tokens(predict_fns):
    images, examples = common.load_images(ds)
    return token_class_scores(predict_fns, params, images, class_names, prompts_fn,
                              batch_size), examples
  classes = class_embeddings(predict_fns, params, class_names, prompts_fn, batch_size)
  image_emb, examples = common.embed_images(predict_fns, params, ds, batch_size)
  return image_emb @ classes.T, examples


def top_predictions(predict_fns, params, cfg, num: int = 8, k: int = 3,
                    mesh=None) -> dict:
  """The top-`k` classes of the first `num` images of zero-shot evaluator `cfg` (an
  `evaluation.eval_config`) under `mesh`, for showing predictions beside their images
  (the demo notebook): {'images' [n, H, W, 3] (model input), 'labels' [n], 'top'
  [n, k] class ids, 'probs' [n, k] (softmax over 100 x the scores), 'class_names'}."""
  cfg = config_dict.ConfigDict(cfg.to_dict())
  cfg.size = num
  ds, source = common.load_eval_set(cfg)
  where = f"config.evals.{cfg.name}"
  # The evaluator's own resolution of class names and templates.
  names = list(classnames_lib.resolve(cfg.classnames, cfg.source, source,
                                      f"{where}.classnames").names)
  templates = templates_lib.resolve(cfg.templates, cfg.source, source,
                                    f"{where}.templates")
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    scores, examples = class_scores(predict_fns, params, ds, names, templates.prompts,
                                    cfg.batch_size)
  logits = 100.0 * scores
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  top = np.argsort(-probs, axis=1)[:, :k]
  return {"images": np.stack([e["image"] for e in examples]),
          "labels": np.array([e.get("label", -1) for e in examples]), "top": top,
          "probs": np.take_along_axis(probs, top, axis=1), "class_names": names}


def check(cfg, where):
  templates_lib.check(cfg.templates, f"{where}.templates")
  classnames_lib.check(cfg.classnames, f"{where}.classnames")
  subset = cfg.get("class_subset", "")
  if subset and subset not in imagenet_names.SUBSETS:
    raise errors.ConfigError(
        f"{where}.class_subset={subset!r} is not one of "
        f"{sorted(imagenet_names.SUBSETS)} ('' scores every class).")


def restrict_to_subset(class_names, labels, subset: str, where: str):
  """(class names, labels) of the 200-way protocol of `subset`: the subset's
  ImageNet classes in its order, each label mapped to its position there (-1 for
  labels outside the subset)."""
  index = imagenet_names.SUBSETS[subset]
  if len(class_names) != len(imagenet_names.IMAGENET):
    raise errors.ConfigError(
        f"{where}.class_subset={subset!r} needs the 1,000 ImageNet classes, got "
        f"{len(class_names)} class names; use a tfds:{subset} source (its labels are "
        "ImageNet's) or unset class_subset.")
  position = np.full(len(class_names), -1, np.int64)
  position[list(index)] = np.arange(len(index))
  mapped = np.where(labels >= 0, position[np.maximum(labels, 0)], -1)
  return [class_names[i] for i in index], mapped


@EVALUATORS.register("zeroshot",
                     options={"templates": (), "classnames": (), "class_subset": ""},
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
  subset = cfg.get("class_subset", "")
  if subset:
    class_names, _ = restrict_to_subset(class_names, np.zeros(0, np.int64), subset,
                                        where)
  scores, examples = class_scores(predict_fns, params, ds, class_names,
                                  templates.prompts, cfg.batch_size)
  labels = np.array([e.get("label", -1) for e in examples])
  if subset:
    _, labels = restrict_to_subset(list(names.names), labels, subset, where)
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f"Zero-shot source '{cfg.source}' split '{cfg.split}' has no "
                     "labelled examples.")
  result = metrics.topk_accuracy(scores[keep], labels[keep], ks=(1, 5))
  result["num_examples"] = int(keep.sum())
  return result
