"""Zero-shot classification: class names x prompt templates, prompt ensembling."""
import numpy as np

from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS

DEFAULT_TEMPLATES = ("a photo of a {}.",)


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


@EVALUATORS.register("zeroshot")
def zeroshot(predict_fns, params, cfg):
  """top-1 / top-5 accuracy of labelled eval images against prompt-ensembled classes."""
  ds, source = common.load_eval_set(cfg)
  if not hasattr(source, "class_names"):
    raise ValueError(f"Zero-shot source '{cfg.source}' has no class names; use a "
                     "labelled source (e.g. 'shapes').")
  prompts_fn = getattr(source, "class_prompts",
                       lambda name: [t.format(name) for t in DEFAULT_TEMPLATES])
  classes = class_embeddings(predict_fns, params, source.class_names, prompts_fn,
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
