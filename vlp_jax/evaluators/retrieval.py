"""Image <-> text retrieval: R@1/5/10 in both directions, several captions per image."""
import numpy as np

from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS


@EVALUATORS.register("retrieval")
def retrieval(predict_fns, params, cfg):
  """Recall@k of every image's captions and every caption's image."""
  ds, _ = common.load_eval_set(cfg)
  image_emb, examples = common.embed_images(predict_fns, params, ds, cfg.batch_size)
  texts, owner = [], []
  for i, e in enumerate(examples):
    texts.extend(e["text"])
    owner.extend([i] * len(e["text"]))
  text_emb = common.embed_texts(predict_fns, params, texts, cfg.batch_size)
  result = metrics.retrieval_recall(image_emb, text_emb, np.array(owner), ks=(1, 5, 10))
  result["num_images"], result["num_texts"] = len(examples), len(texts)
  return result
