"""Shared evaluator plumbing: loading the eval set and running fixed-size batches.

The data stack (grain) is imported when an evaluator runs, not when this package is
imported: recipes and tools that only read configs import `vlp_jax.evaluators`.
"""
import numpy as np


def load_eval_set(cfg):
  """(list of examples, source) for the evaluator's `source` / `split` / `size`."""
  from vlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.eval_examples(cfg.source, cfg.split, cfg.size, cfg.data)


def run_padded(fn, params, array: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies `fn(params, batch)` over `array` in batches padded to `batch_size`
  (one compiled shape), and concatenates the unpadded results."""
  outs = []
  for start in range(0, len(array), batch_size):
    chunk = array[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      pad = np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    outs.append(np.asarray(fn(params, chunk))[:n])
  return np.concatenate(outs) if outs else np.zeros((0,))


def embed_images(predict_fns, params, ds, batch_size):
  """-> (image embeddings [N, D], list of examples)."""
  examples = [ds[i] for i in range(len(ds))]
  images = np.stack([e["image"] for e in examples])
  return run_padded(predict_fns["embed_image"], params, images, batch_size), examples


def embed_texts(predict_fns, params, texts, batch_size):
  tokens = predict_fns["tokenize"](texts)
  return run_padded(predict_fns["embed_text"], params, tokens, batch_size)
