"""Image <-> text retrieval: R@k in both directions, several captions per image.

The standard protocol (COCO 5k / Flickr30k 1k Karpathy test splits): image->text
R@k counts an image when any of its captions ranks in the top k; text->image R@k
counts a caption when its image does. An example's captions are its 'text' list (a
`jsonl:` line with "caption": [...], e.g. from tools/karpathy_to_jsonl.py); with
option `group_by_image` (default on) examples with the same 'key' (the image path of
`jsonl:`/`csv:` records: a table with one row per caption) are one image with all
their captions. `size` counts records, not images. Option `ks`: the cut-offs.

Models with token embeddings (FILIP) are scored token-wise: images rank texts by
s^I, texts rank images by s^T (two different matrices, `objectives.filip`).
"""
import numpy as np
from absl import logging

from vlp_jax import errors
from vlp_jax.evaluators import common, metrics
from vlp_jax.registry import EVALUATORS


def group_captions(examples, by_key: bool):
  """(indices of the examples whose image is scored, the captions, each caption's
  image index into those): examples sharing a 'key' (with `by_key`) are one image."""
  images, texts, owner, slot = [], [], [], {}
  for i, e in enumerate(examples):
    key = e.get("key") if by_key else None
    if key is None or key not in slot:
      if key is not None:
        slot[key] = len(images)
      images.append(i)
    j = slot[key] if key is not None else len(images) - 1
    texts.extend(e["text"])
    owner.extend([j] * len(e["text"]))
  return images, texts, np.array(owner, np.int64)


def check(cfg, where):
  ks = tuple(cfg.ks)
  if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                       for k in ks):
    raise errors.ConfigError(f"{where}.ks={ks!r} must be a non-empty list of "
                             "cut-offs >= 1, e.g. (1, 5, 10).")


@EVALUATORS.register("retrieval", options={"ks": (1, 5, 10), "group_by_image": True},
                     check=check)
def retrieval(predict_fns, params, cfg):
  """Recall@k of every image's captions and every caption's image."""
  ds, _ = common.load_eval_set(cfg)
  examples = [ds[i] for i in range(len(ds))]
  keep, texts, owner = group_captions(examples, cfg.group_by_image)
  if len(keep) < len(examples):
    logging.info("retrieval: %d records are %d images (same key).", len(examples),
                 len(keep))
  images = np.stack([examples[i]["image"] for i in keep])
  ks = tuple(cfg.ks)
  if common.scores_tokens(predict_fns):
    text_tokens = common.embed_text_tokens(predict_fns, params, texts, cfg.batch_size)
    i2t, t2i = common.image_token_scores(predict_fns, params, images, cfg.batch_size,
                                         text_tokens)
    result = metrics.retrieval_recall_from_scores(i2t, t2i, owner, ks=ks)
  else:
    image_emb = common.run_padded(predict_fns["embed_image"], params, images,
                                  cfg.batch_size)
    text_emb = common.embed_texts(predict_fns, params, texts, cfg.batch_size)
    result = metrics.retrieval_recall(image_emb, text_emb, owner, ks=ks)
  result["num_images"], result["num_texts"] = len(keep), len(texts)
  return result
