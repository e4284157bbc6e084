"""Shared evaluator plumbing: loading the eval set, running fixed-size batches, and
the blocked token-wise (FILIP) scoring.

The data stack (grain) is imported when an evaluator runs, not when this package is
imported: recipes and tools that only read configs import `vlp_jax.evaluators`.
"""
from typing import NamedTuple

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


def load_images(ds):
  """-> (images [N, H, W, 3], list of examples)."""
  examples = [ds[i] for i in range(len(ds))]
  return np.stack([e["image"] for e in examples]), examples


def embed_images(predict_fns, params, ds, batch_size):
  """-> (image embeddings [N, D], list of examples)."""
  images, examples = load_images(ds)
  return run_padded(predict_fns["embed_image"], params, images, batch_size), examples


def embed_texts(predict_fns, params, texts, batch_size):
  tokens = predict_fns["tokenize"](texts)
  return run_padded(predict_fns["embed_text"], params, tokens, batch_size)


# ------------------------------------------------- token-wise (FILIP) scoring, blocked


def scores_tokens(predict_fns) -> bool:
  """Whether the model scores image-text pairs token-wise (FILIP): the predict fns
  then hold `embed_image_tokens`, `embed_text_tokens` and `token_scores`
  (`train/predict.py`)."""
  return all(k in predict_fns for k in
             ("embed_image_tokens", "embed_text_tokens", "token_scores"))


class TextTokens(NamedTuple):
  """Token embeddings of a list of texts, kept as the predict fn returned them (on
  the device) in blocks of `batch_size` rows (the last padded)."""
  blocks: list   # [(token embeddings [b, T, d], mask [b, T])]
  counts: list   # real rows of each block
  length: int    # text positions to score: the longest real sequence's, rounded up


def embed_text_tokens(predict_fns, params, texts, batch_size) -> TextTokens:
  """Embeds `texts` token-wise in fixed-size blocks (one compiled shape)."""
  tokens = predict_fns["tokenize"](texts)
  blocks, counts, length = [], [], 1
  for start in range(0, len(tokens), batch_size):
    chunk, n = _pad_rows(tokens[start:start + batch_size], batch_size)
    emb, mask = predict_fns["embed_text_tokens"](params, chunk)
    real = np.nonzero(np.asarray(mask)[:n].any(axis=0))[0]
    length = max(length, int(real[-1]) + 1 if real.size else 0)
    blocks.append((emb, mask))
    counts.append(n)
  if blocks:  # Up to a multiple of 8 (masked anyway): fewer shapes to compile.
    length = min(-(-length // 8) * 8, blocks[0][1].shape[1])
  return TextTokens(blocks, counts, length)


def image_token_scores(predict_fns, params, images, batch_size, texts: TextTokens,
                       reduce=None):
  """FILIP scores of every image against every text, in blocks: `batch_size` images
  (embedded token-wise, never stored) x one block of `texts` at a time, each a fixed
  shape (`token_scores` compiles once; within it the similarities are chunked too),
  so no [N_img, N_txt, N, T] array exists.

  Returns (s^I, s^T) as [N_img, N_txt] float32 arrays, or, with
  `reduce(i2t_rows, t2i_rows) -> rows`, the concatenation of what `reduce` makes of
  each block of image rows (e.g. zero-shot's per-class means).
  """
  rows = []
  for start in range(0, len(images), batch_size):
    chunk, n = _pad_rows(images[start:start + batch_size], batch_size)
    img = predict_fns["embed_image_tokens"](params, chunk)
    # Dispatch every text block before reading any result back.
    outs = [predict_fns["token_scores"](img, emb, mask, length=texts.length)
            for emb, mask in texts.blocks]
    i2t = [np.asarray(a, np.float32)[:n, :c] for (a, _), c in zip(outs, texts.counts)]
    t2i = [np.asarray(b, np.float32)[:n, :c] for (_, b), c in zip(outs, texts.counts)]
    i2t = np.concatenate(i2t, axis=1) if i2t else np.zeros((n, 0), np.float32)
    t2i = np.concatenate(t2i, axis=1) if t2i else np.zeros((n, 0), np.float32)
    rows.append(reduce(i2t, t2i) if reduce else (i2t, t2i))
  if reduce:
    return np.concatenate(rows) if rows else np.zeros((0,))
  if not rows:
    empty = np.zeros((0, sum(texts.counts)), np.float32)
    return empty, empty
  return (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]))


def _pad_rows(chunk: np.ndarray, size: int):
  """(`chunk` zero-padded to `size` rows, its real row count)."""
  n = len(chunk)
  if n < size:
    chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], chunk.dtype)])
  return chunk, n
