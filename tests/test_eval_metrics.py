"""Tests for vlp_jax.evaluators.metrics against brute force and hand-worked values."""
import collections
import math

import numpy as np
import pytest

from vlp_jax.evaluators import metrics

# ----------------------------------------------------------------------------
# Top-k accuracy.


def _topk_brute(scores, labels, k):
  hits = 0
  for row, label in zip(scores, labels):
    higher = sum(1 for c in range(len(row)) if row[c] > row[label])
    hits += higher < min(k, len(row))
  return hits / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n, c = 40, 7
  scores = rng.integers(0, 4, size=(n, c)).astype(np.float32)  # Many ties.
  labels = rng.integers(0, c, size=n)
  got = metrics.topk_accuracy(scores, labels, ks=(1, 2, 5, 10))
  for k in (1, 2, 5, 10):
    assert got[f"top{k}"] == pytest.approx(_topk_brute(scores, labels, k))


def test_topk_hand_cases():
  scores = np.array([[0.1, 0.9, 0.0],    # label 1 is best.
                     [0.5, 0.5, 0.2],    # label 0 ties the best -> top-1 hit.
                     [0.3, 0.2, 0.1]])   # label 2 is last.
  labels = np.array([1, 0, 2])
  got = metrics.topk_accuracy(scores, labels)
  assert got["top1"] == pytest.approx(2 / 3)
  assert got["top5"] == 1.0  # k clipped to C = 3.
  assert metrics.topk_accuracy(scores, labels, ks=(2,))["top2"] == (
      pytest.approx(2 / 3))


# ----------------------------------------------------------------------------
# Retrieval recall.


def _retrieval_brute(img, txt, owner, ks):
  ni, nt = len(img), len(txt)
  sim = [[float(np.dot(img[i], txt[t])) for t in range(nt)] for i in range(ni)]
  out = {}
  i2t_ranks = []
  for i in range(ni):
    own = [t for t in range(nt) if owner[t] == i]
    if not own:
      continue
    ranks = [sum(1 for u in range(nt) if sim[i][u] > sim[i][t]) for t in own]
    i2t_ranks.append(min(ranks))
  t2i_ranks = [sum(1 for j in range(ni) if sim[j][t] > sim[owner[t]][t])
               for t in range(nt)]
  for k in ks:
    out[f"i2t_r{k}"] = sum(r < k for r in i2t_ranks) / len(i2t_ranks)
  for k in ks:
    out[f"t2i_r{k}"] = sum(r < k for r in t2i_ranks) / nt
  return out


@pytest.mark.parametrize("seed,chunk_size", [(0, 1024), (1, 3), (2, 4), (3, 1)])
def test_retrieval_matches_brute_force(seed, chunk_size):
  rng = np.random.default_rng(seed)
  ni, d = 13, 4
  owner = rng.integers(0, ni, size=30)  # Several texts per image, some none.
  # Small integer entries make dot products exact and ties common.
  img = rng.integers(-2, 3, size=(ni, d)).astype(np.float32)
  txt = rng.integers(-2, 3, size=(len(owner), d)).astype(np.float32)
  img[5] = img[4]  # Duplicate images: exact ties for texts of either.
  ks = (1, 2, 5, 10)
  got = metrics.retrieval_recall(img, txt, owner, ks=ks, chunk_size=chunk_size)
  want = _retrieval_brute(img, txt, owner, ks)
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key]), key


def test_retrieval_matches_brute_force_gaussian():
  rng = np.random.default_rng(7)
  img = rng.normal(size=(20, 8))
  owner = np.repeat(np.arange(20), 3)  # COCO-like: 3 texts per image.
  txt = img[owner] + rng.normal(scale=1.5, size=(60, 8))
  got = metrics.retrieval_recall(img, txt, owner, chunk_size=6)
  want = _retrieval_brute(img, txt, owner, (1, 5, 10))
  for key in want:
    assert got[key] == pytest.approx(want[key]), key
  assert 0 < got["t2i_r1"] < 1  # Non-trivial case.


def test_retrieval_identity_is_perfect():
  emb = np.eye(6)
  got = metrics.retrieval_recall(emb, emb, np.arange(6), chunk_size=4)
  assert all(v == 1.0 for v in got.values())
  assert sorted(got) == sorted(
      [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)])


def test_retrieval_permuted_case():
  # Texts 1 and 2 are swapped-ish: each looks more like the other's image.
  img = np.eye(4)
  txt = np.array([[1.0, 0.0, 0.0, 0.0],     # Text 0 -> image 0.
                  [0.0, 0.0, 1.0, 0.0],     # Text 1 -> image 1, looks like 2.
                  [0.0, 0.9, 0.5, 0.0],     # Text 2 -> image 2, prefers 1.
                  [0.0, 0.0, 0.0, 1.0]])    # Text 3 -> image 3.
  got = metrics.retrieval_recall(img, txt, np.arange(4), ks=(1, 2))
  # t2i: text 1 sims over images [0, 0, 1, 0]: only image 2 is strictly
  # greater than its own 0 (image 0/3 ties do not count) -> rank 1.
  # Text 2 sims [0, .9, .5, 0] -> rank 1. Texts 0 and 3 -> rank 0.
  assert got["t2i_r1"] == pytest.approx(2 / 4)
  assert got["t2i_r2"] == 1.0
  # i2t: image 1 sims over texts [0, 0, .9, 0] -> own text 1 rank 1;
  # image 2 sims [0, 1, .5, 0] -> own text 2 rank 1.
  assert got["i2t_r1"] == pytest.approx(2 / 4)
  assert got["i2t_r2"] == 1.0


def test_retrieval_i2t_uses_best_own_text():
  img = np.array([[1.0, 0.0], [0.0, 1.0]])
  txt = np.array([[0.2, 0.0], [0.0, 1.0], [0.9, 0.0]])  # Image 0 owns 0 and 2.
  got = metrics.retrieval_recall(img, txt, np.array([0, 1, 0]), ks=(1,))
  assert got["i2t_r1"] == 1.0   # Text 2 is image 0's top text.
  assert got["t2i_r1"] == 1.0


# ----------------------------------------------------------------------------
# Caption normalisation and BLEU.


def test_normalize_caption():
  assert metrics.normalize_caption("A Dog, running!  Top-left; don't.") == [
      "a", "dog", "running", "top", "left", "dont"]


def test_bleu_perfect_is_one():
  cands = ["a dog runs on the beach", "Two cats sleep on a red sofa."]
  refs = [["a dog runs on the beach"], ["two cats sleep on a red sofa"]]
  assert metrics.bleu(cands, refs) == pytest.approx(1.0)


def test_bleu_hand_worked_corpus():
  cands = ["a man rides a red bike on the road", "two dogs play"]
  refs = [["a man rides a bike on the road",
           "a person riding a red bicycle on a road"],
          ["two dogs are playing in the grass", "dogs play outside"]]
  # Candidate 1 (9 tokens), clipped matches per order from the definition:
  #   1-grams: a(2, refs allow 3) man rides red bike on the road -> 9 of 9.
  #   2-grams: a man, man rides, rides a, a red, bike on, on the, the road
  #            match; "red bike" does not -> 7 of 8.
  #   3-grams: a man rides, man rides a, bike on the, on the road -> 4 of 7.
  #   4-grams: a man rides a, bike on the road -> 2 of 6.
  #   Closest reference length: 9.
  # Candidate 2 (3 tokens): two, dogs, play -> 3 of 3; two dogs, dogs play
  #   -> 2 of 2; "two dogs play" -> 0 of 1; no 4-grams. Closest length 3.
  p1, p2, p3, p4 = 12 / 12, 9 / 10, 4 / 8, 2 / 6
  c, r = 12, 12
  bp = 1.0 if c > r else math.exp(1 - r / c)
  want = bp * (p1 * p2 * p3 * p4) ** 0.25
  assert want == pytest.approx(0.15 ** 0.25)
  assert metrics.bleu(cands, refs) == pytest.approx(want, rel=1e-12)


def test_bleu_clips_to_max_reference_count():
  # Papineni et al.'s example: "the" occurs 7 times in the candidate, at most
  # twice in any single reference -> clipped unigram precision 2 / 7.
  # Closest reference length to 7 is 7, so BP = 1.
  refs = [["the cat is on the mat", "there is a cat on the mat"]]
  got = metrics.bleu(["the the the the the the the"], refs, max_n=1)
  assert got == pytest.approx(2 / 7)


def test_bleu_brevity_penalty():
  got = metrics.bleu(["the cat sat on the mat"],
                     [["the cat sat on the mat today"]])
  assert got == pytest.approx(math.exp(1 - 7 / 6))


def test_bleu_closest_length_ties_pick_shorter():
  # References of length 5 and 7 are equally close to 6 -> r = 5 < c, BP = 1.
  got = metrics.bleu(["the cat sat on the mat"],
                     [["the cat sat on the", "the cat sat on the mat now"]])
  assert got == pytest.approx(1.0)


def test_bleu_zero_overlap_and_missing_order():
  assert metrics.bleu(["green apples"], [["a dog runs"]]) == 0.0
  # Unigrams match but no 4-gram exists -> precision 0 -> 0.0.
  assert metrics.bleu(["a dog runs"], [["a dog runs"]]) == 0.0


# ----------------------------------------------------------------------------
# CIDEr-D.


def _cider_d_plain(candidates, references, n=4, sigma=6.0):
  """Straightforward CIDEr-D from the formula, one flat dict per caption."""
  def grams(s):
    w = s.lower().split()
    d = collections.defaultdict(int)
    for k in range(1, n + 1):
      for i in range(len(w) - k + 1):
        d[" ".join(w[i:i + k]) + f"|{k}"] += 1
    return d, len(w)

  num_images = len(references)
  df = collections.defaultdict(int)
  for refs in references:
    seen = set()
    for r in refs:
      seen.update(grams(r)[0].keys())
    for g in seen:
      df[g] += 1

  def vec(d):
    return {g: tf * (math.log(num_images) - math.log(max(1, df[g])))
            for g, tf in d.items()}

  def order(g):
    return int(g.split("|")[1])

  total = 0.0
  for cand, refs in zip(candidates, references):
    hd, hl = grams(cand)
    h = vec(hd)
    per_ref = []
    for r in refs:
      rd, rl = grams(r)
      v = vec(rd)
      sims = []
      for k in range(1, n + 1):
        hk = {g: x for g, x in h.items() if order(g) == k}
        vk = {g: x for g, x in v.items() if order(g) == k}
        num = sum(min(x, vk.get(g, 0.0)) * vk.get(g, 0.0)
                  for g, x in hk.items())
        nh = math.sqrt(sum(x * x for x in hk.values()))
        nv = math.sqrt(sum(x * x for x in vk.values()))
        cos = num / (nh * nv) if nh > 0 and nv > 0 else 0.0
        sims.append(cos * math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2)))
      per_ref.append(sum(sims) / n)
    total += 10.0 * sum(per_ref) / len(per_ref)
  return total / len(candidates)


_WORDS = ["a", "dog", "cat", "red", "on", "the", "sofa", "runs", "big"]


def _random_caption(rng, lo=1, hi=9):
  return " ".join(rng.choice(_WORDS, size=rng.integers(lo, hi)))


@pytest.mark.parametrize("seed", range(5))
def test_cider_d_matches_plain_reimplementation(seed):
  rng = np.random.default_rng(seed)
  num_images = int(rng.integers(2, 7))
  refs = [[_random_caption(rng) for _ in range(rng.integers(1, 5))]
          for _ in range(num_images)]
  cands = [_random_caption(rng) if rng.random() < 0.7 else
           rng.choice(rs) for rs in refs]
  want = _cider_d_plain(cands, refs)
  assert metrics.cider_d(cands, refs) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_cider_d_hand_value_distinct_captions():
  # Disjoint references, candidate == reference: every n-gram has df = 1, so
  # all cosines are 1 and the score is 10 (4+ words) or 10 * 3 / 4 (3 words).
  refs = [["a dog runs on grass"], ["two red cats sleep"], ["blue sky today"]]
  cands = [r[0] for r in refs]
  assert metrics.cider_d(cands[:2], refs[:2]) == pytest.approx(10.0)
  assert metrics.cider_d(cands, refs) == pytest.approx((10 + 10 + 7.5) / 3)


def test_cider_d_matched_beats_mismatched():
  refs = [["a dog runs on the beach", "a brown dog running on sand"],
          ["two cats sleep on a sofa", "cats sleeping on a red couch"],
          ["a man rides a bike", "a person riding a bicycle on a road"]]
  matched = ["a dog runs on the beach", "two cats sleep on a sofa",
             "a man rides a bike"]
  mismatched = [matched[1], matched[2], matched[0]]
  good = metrics.cider_d(matched, refs)
  bad = metrics.cider_d(mismatched, refs)
  assert good > bad
  assert good > 1.0


def test_cider_d_penalises_repetition():
  refs = [["a dog runs on the beach"], ["two cats sleep on a sofa"],
          ["a man rides a bike"]]
  exact = ["a dog runs on the beach", refs[1][0], refs[2][0]]
  doubled = ["a dog runs on the beach a dog runs on the beach",
             refs[1][0], refs[2][0]]
  assert metrics.cider_d(doubled, refs) < metrics.cider_d(exact, refs)


# ----------------------------------------------------------------------------
# Keyword accuracy.


def test_keyword_accuracy():
  cands = ["A red ball in the top-left corner.",
           "a red ball in the left top corner",
           "A blue cube.",
           "anything at all"]
  kws = [["red", "top left"], ["red", "top left"], ["Blue", "cube"], []]
  assert metrics.keyword_accuracy(cands, kws) == pytest.approx(3 / 4)
  assert metrics.keyword_accuracy(["a cat"], [["dog"]]) == 0.0
  assert metrics.keyword_accuracy(["cats"], [["cat"]]) == 0.0  # Whole tokens.
