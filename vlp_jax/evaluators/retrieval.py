"""Image <-> text retrieval: R@1/5/10 in both directions, several captions per image.

Models with token embeddings (FILIP) are scored token-wise: images rank texts by
s^I, texts rank images by s^T (two different matrices, `objectives.filip`).
"""
import numpy as np

from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS


@EVALUATORS.register("retrieval")
def retrieval(predict_fns, params, cfg):
  """Recall@k of every image's captions and every caption's image."""
  ds, _ = common.load_eval_set(cfg)
  images, examples = common.load_images(ds)
  texts, owner = [], []
  for i, e in enumerate(examples):
    texts.extend(e["text"])
    owner.extend([i] * len(e["text"]))
  if common.scores_tokens(predict_fns):
    text_tokens = common.embed_text_tokens(predict_fns, params, texts, cfg.batch_size)
    i2t, t2i = common.image_token_scores(predict_fns, params, images, cfg.batch_size,
                                         text_tokens)
    result = metrics.retrieval_recall_from_scores(i2t, t2i, np.array(owner),
                                                  ks=(1, 5, 10))
  else:
    image_emb = common.run_padded(predict_fns["embed_image"], params, images,
                                  cfg.batch_size)
    text_emb = common.embed_texts(predict_fns, params, texts, cfg.batch_size)
    result = metrics.retrieval_recall(image_emb, text_emb, np.array(owner),
                                      ks=(1, 5, 10))
  result["num_images"], result["num_texts"] = len(examples), len(texts)
  return result
