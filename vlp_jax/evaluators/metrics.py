"""Pure NumPy / Python evaluation metrics for vision-language models.

Classification (`topk_accuracy`, from a score matrix), image-text retrieval
(`retrieval_recall` from embeddings, `retrieval_recall_from_scores` from score
matrices) and captioning (`bleu`, `cider_d`, `keyword_accuracy`). Inputs are NumPy arrays
or Python lists; nothing here depends on JAX. Ranks use the "strictly greater"
convention throughout: ties are resolved in favour of the correct item.
"""
import collections
import math
import re
from typing import Dict, List, Sequence

import numpy as np

_APOSTROPHES = re.compile(r"['\u2019]")
_PUNCT = re.compile(r"[^\w\s]|_")


def topk_accuracy(scores, labels, ks=(1, 5)) -> Dict[str, float]:
  """Top-k accuracy of `scores` [N, C] against integer `labels` [N].

  A label is within the top k when fewer than k classes score strictly higher
  than it; k is clipped to C. Returns {'top{k}': fraction} for each k.
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels).astype(np.int64)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"Bad shapes: scores {scores.shape}, labels {labels.shape}.")
  n, c = scores.shape
  if n and (labels.min() < 0 or labels.max() >= c):
    raise ValueError(f"labels must lie in [0, {c}).")
  label_scores = scores[np.arange(n), labels]
  ranks = np.sum(scores > label_scores[:, None], axis=1)
  return {f"top{k}": float(np.mean(ranks < min(k, c))) if n else 0.0
          for k in ks}


def retrieval_recall(image_emb, text_emb, text_to_image, ks=(1, 5, 10),
                     chunk_size=1024) -> Dict[str, float]:
  """Image->text and text->image Recall@k with dot-product similarity.

  Args:
    image_emb: [Ni, D] image embeddings.
    text_emb: [Nt, D] text embeddings.
    text_to_image: [Nt] int index of the image each text describes; an image
      may have several texts.
    ks: recall cut-offs.
    chunk_size: image rows of the [Ni, Nt] similarity matrix held at once.

  Returns:
    {'i2t_r{k}', 't2i_r{k}': fraction in [0, 1]}. An image counts as retrieved
    at k when its best-ranked own text has rank < k (rank = number of texts
    with strictly greater similarity); images without texts are left out of
    the i2t average. A text counts when its image has rank < k.
  """
  img, txt = np.asarray(image_emb), np.asarray(text_emb)
  dtype = np.result_type(img.dtype, txt.dtype, np.float32)
  img, txt = img.astype(dtype), txt.astype(dtype)
  owner = np.asarray(text_to_image).astype(np.int64)
  ni, nt = img.shape[0], txt.shape[0]
  if owner.shape != (nt,) or (nt and (owner.min() < 0 or owner.max() >= ni)):
    raise ValueError("text_to_image must be [Nt] indices into image_emb.")
  chunks = [(s, min(s + chunk_size, ni)) for s in range(0, ni, chunk_size)]

  # Pass 1: image->text ranks, and each text's similarity to its own image.
  # Both passes compute identical chunk products, so ties compare exactly.
  i2t_rank = np.full(ni, np.inf)
  own_sim = np.empty(nt, dtype)
  for s, e in chunks:
    sim = img[s:e] @ txt.T
    is_own = owner[None, :] == np.arange(s, e)[:, None]
    best_own = np.where(is_own, sim, -np.inf).max(axis=1, initial=-np.inf)
    has_text = is_own.any(axis=1)
    i2t_rank[s:e][has_text] = np.sum(
        sim[has_text] > best_own[has_text, None], axis=1)
    in_chunk = (owner >= s) & (owner < e)
    own_sim[in_chunk] = sim[owner[in_chunk] - s, np.nonzero(in_chunk)[0]]

  # Pass 2: text->image ranks.
  t2i_rank = np.zeros(nt, np.int64)
  for s, e in chunks:
    t2i_rank += np.sum(img[s:e] @ txt.T > own_sim[None, :], axis=0)

  i2t_rank = i2t_rank[np.isfinite(i2t_rank)]
  return _recalls(i2t_rank, t2i_rank, ks)


def _recalls(i2t_rank, t2i_rank, ks) -> Dict[str, float]:
  """{'i2t_r{k}', 't2i_r{k}'}: the fraction of ranks below each k (0 when empty)."""
  out = {}
  for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(ranks < k)) if np.size(ranks) else 0.0
  return out


def retrieval_recall_from_scores(i2t_scores, t2i_scores, text_to_image,
                                 ks=(1, 5, 10)) -> Dict[str, float]:
  """`retrieval_recall` from precomputed [Ni, Nt] score matrices, for scores that are
  not one dot product (FILIP's token-wise s^I and s^T differ per direction).

  Args:
    i2t_scores: [Ni, Nt]; row i ranks the texts for image i.
    t2i_scores: [Ni, Nt]; column t ranks the images for text t (None: i2t_scores).
    text_to_image: [Nt] int index of the image each text describes.
    ks: recall cut-offs.

  Returns:
    {'i2t_r{k}', 't2i_r{k}'} with `retrieval_recall`'s conventions (strictly greater
    ranks; images without texts left out of the i2t average).
  """
  i2t = np.asarray(i2t_scores)
  t2i = i2t if t2i_scores is None else np.asarray(t2i_scores)
  if i2t.ndim != 2 or t2i.shape != i2t.shape:
    raise ValueError(f"i2t_scores {i2t.shape} and t2i_scores {t2i.shape} must both "
                     "be [Ni, Nt].")
  ni, nt = i2t.shape
  owner = np.asarray(text_to_image).astype(np.int64)
  if owner.shape != (nt,) or (nt and (owner.min() < 0 or owner.max() >= ni)):
    raise ValueError("text_to_image must be [Nt] indices into the score rows.")
  cols = np.arange(nt)
  best_own = np.full(ni, -np.inf, np.result_type(i2t.dtype, np.float32))
  np.maximum.at(best_own, owner, i2t[owner, cols])
  has_text = np.bincount(owner, minlength=ni) > 0
  i2t_rank = np.sum(i2t[has_text] > best_own[has_text, None], axis=1)
  t2i_rank = np.sum(t2i > t2i[owner, cols][None, :], axis=0)
  return _recalls(i2t_rank, t2i_rank, ks)


def normalize_caption(s: str) -> List[str]:
  """Lowercases, strips punctuation and splits on whitespace.

  Apostrophes are deleted ("don't" -> "dont"); other punctuation becomes a
  word break ("top-left" -> ["top", "left"]).
  """
  s = _APOSTROPHES.sub("", s.lower())
  return _PUNCT.sub(" ", s).split()


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  """Counts of the n-grams (as tuples) of order exactly `n` in `tokens`."""
  return collections.Counter(
      tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: List[str], references: List[List[str]],
         max_n: int = 4) -> float:
  """Corpus-level BLEU (Papineni et al.; COCO caption toolkit conventions).

  Clipped n-gram matches and candidate n-gram totals are summed over the
  corpus; the score is the uniform geometric mean of the precisions times the
  brevity penalty BP = 1 if c > r else exp(1 - r / c), where c is the total
  candidate length and r sums, per candidate, the reference length closest to
  its length (ties -> shorter). Returns 0.0 when any precision is 0.
  """
  if len(candidates) != len(references):
    raise ValueError("candidates and references differ in length.")
  matches, totals = np.zeros(max_n), np.zeros(max_n)
  cand_len = ref_len = 0
  for cand, refs in zip(candidates, references):
    tokens = normalize_caption(cand)
    ref_tokens = [normalize_caption(r) for r in refs]
    if not ref_tokens:
      raise ValueError("Each candidate needs at least one reference.")
    cand_len += len(tokens)
    ref_len += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
    for n in range(1, max_n + 1):
      max_ref = collections.Counter()
      for r in ref_tokens:
        max_ref |= _ngrams(r, n)  # Element-wise max over references.
      counts = _ngrams(tokens, n)
      matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
      totals[n - 1] += sum(counts.values())
  if np.any(matches == 0):
    return 0.0
  log_p = np.mean(np.log(matches / totals))
  bp = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
  return float(bp * math.exp(log_p))


def _tfidf(counts, doc_freq, log_num_docs, n):
  """Per-order tf-idf vectors (dicts) and their L2 norms."""
  vecs = [{} for _ in range(n)]
  for k in range(n):
    for g, tf in counts[k].items():
      vecs[k][g] = tf * (log_num_docs - math.log(max(1.0, doc_freq[g])))
  norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
  return vecs, norms


def cider_d(candidates: List[str], references: List[List[str]], n: int = 4,
            sigma: float = 6.0) -> float:
  """Corpus CIDEr-D (Vedantam et al.), following pycocoevalcap's CiderD.

  Document frequencies come from the reference sets of the evaluated corpus
  (an n-gram counts once per image); idf = log(N_images) - log(max(1, df)).
  Per image and reference, for each order 1..n: cosine of tf-idf vectors with
  the candidate clipped to the reference (sum min(h, r) * r / (|h| |r|)),
  times the length penalty exp(-(len_h - len_r)^2 / (2 sigma^2)). The score
  averages over orders and references, times 10; the corpus score is the
  mean over images. (pycocoevalcap measures length in bigrams, which gives the
  same delta whenever both captions are non-empty; with an empty caption the
  similarity is 0 either way.)
  """
  if len(candidates) != len(references):
    raise ValueError("candidates and references differ in length.")
  if not candidates:
    return 0.0

  def cook(s):
    tokens = normalize_caption(s)
    return [_ngrams(tokens, k) for k in range(1, n + 1)], len(tokens)

  cands = [cook(c) for c in candidates]
  refs = [[cook(r) for r in rs] for rs in references]
  doc_freq = collections.Counter()
  for rs in refs:
    doc_freq.update({g for counts, _ in rs for c in counts for g in c})
  log_num_docs = math.log(float(len(refs)))

  scores = []
  for (c_counts, c_len), rs in zip(cands, refs):
    if not rs:
      raise ValueError("Each candidate needs at least one reference.")
    hyp, hyp_norm = _tfidf(c_counts, doc_freq, log_num_docs, n)
    total = 0.0
    for r_counts, r_len in rs:
      ref, ref_norm = _tfidf(r_counts, doc_freq, log_num_docs, n)
      penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        dot = sum(min(h, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0)
                  for g, h in hyp[k].items())
        if hyp_norm[k] and ref_norm[k]:
          dot /= hyp_norm[k] * ref_norm[k]
        total += dot * penalty
    scores.append(10.0 * total / (n * len(rs)))
  return float(np.mean(scores))


def keyword_accuracy(candidates: List[str], keywords: List[List[str]]) -> float:
  """Fraction of candidates containing all of their keywords.

  Keywords are normalized like captions; a multi-word keyword must occur as a
  contiguous phrase of the normalized candidate.
  """
  if len(candidates) != len(keywords):
    raise ValueError("candidates and keywords differ in length.")
  if not candidates:
    return 0.0
  hits = 0
  for cand, kws in zip(candidates, keywords):
    tokens = normalize_caption(cand)
    hits += all(_contains_phrase(tokens, normalize_caption(kw)) for kw in kws)
  return hits / len(candidates)


def _contains_phrase(tokens: List[str], phrase: List[str]) -> bool:
  """Whether `phrase` occurs contiguously in `tokens` (empty phrase: True)."""
  m = len(phrase)
  return any(tokens[i:i + m] == phrase for i in range(len(tokens) - m + 1))
