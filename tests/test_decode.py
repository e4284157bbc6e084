"""KV-cached decoding (models/kv_decode.py, beam_search.py, generate.py): the cache
against the uncached decoder, greedy / beam search / nucleus sampling against plain
loops, on tiny CoCa models of both layouts and on a hand-written Markov LM."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_generate
from tests.test_generate import BOS, EOS, PAD, L, S, V, random_params
from vlp_jax import errors, models
from vlp_jax.models import beam_search, generate, kv_decode

B = 4

# Model variants: (coca_layout, scan_layers, fused_qkv, remat).
VARIANTS = {
    "vlp_jax": ("vlp_jax", False, False, "none"),
    "vlp_jax_scan_fused": ("vlp_jax", True, True, "full"),
    "open_clip": ("open_clip", False, False, "none"),
    "open_clip_scan": ("open_clip", True, True, "none"),
}


def tiny_config(layout, scan, fused, remat):
  c = test_generate.tiny_coca_config()
  c.update(coca_layout=layout, scan_layers=scan, fused_qkv=fused, remat=remat)
  c.decoder.depth = 2
  if layout == "open_clip":
    c.embed_dim = c.text.width
  return c


def with_end_bias(params, amount):
  """Raises the EOS logit by `amount` through the vocabulary-projection bias
  (open_clip's projection has none: unchanged there, its random captions end by
  themselves)."""
  proj = params["vocab_proj"]
  if "bias" in proj:
    return dict(params, vocab_proj=dict(proj, bias=proj["bias"].at[EOS].add(amount)))
  return params


class Setup:
  """A tiny CoCa, random params, images and its jitted decoders (compiled once)."""

  def __init__(self, variant):
    self.model = models.build_model(tiny_config(*VARIANTS[variant]))
    self.images = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, S, 3)),
                              jnp.float32)
    self.params = random_params(self.model, self.images, seed=3)
    m = self.model
    self.uncached = jax.jit(lambda p, x: generate.greedy_generate(
        m, p, x, max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD))
    self.greedy = jax.jit(lambda p, x: kv_decode.greedy(m, p, x, L, BOS, EOS, PAD))
    self.apply = jax.jit(m.apply, static_argnames="method")


_SETUPS = {}


def setup_for(variant):
  if variant not in _SETUPS:
    _SETUPS[variant] = Setup(variant)
  return _SETUPS[variant]


# The fast set checks both layouts unscanned; the scanned (and fused, rematted)
# variants compile slowly: in the slow set.
FAST_VARIANTS = ("vlp_jax", "open_clip")


@pytest.fixture(scope="module", params=[
    v if v in FAST_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
    for v in VARIANTS])
def setup(request):
  return setup_for(request.param)


@pytest.fixture(scope="module")
def plain():
  return setup_for("vlp_jax")


# ------------------------------------------------------------------ the cache itself


def cached_logits(model, params, images, tokens):
  """Teacher-forced: the cached step's logits at every position [B, L, V]."""
  context = kv_decode.encode(model, params, images)
  cache = kv_decode.init_cache(model, params, context, tokens.shape[1])
  first, cache = kv_decode.step(model, params, cache, tokens[:, 0], jnp.int32(0),
                                context)

  def body(cache, t):
    logits, cache = kv_decode.step(model, params, cache, tokens[:, t], t)
    return cache, logits
  _, rest = jax.lax.scan(body, cache, jnp.arange(1, tokens.shape[1]))
  return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


@pytest.mark.slow
def test_cached_steps_equal_full_decode(setup):
  """Every cached step's logits = the uncached decoder's over the whole sequence
  (positions, causal cache, cross-attention keys cached after step 0)."""
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, V, (B, L)), jnp.int32)
  tokens = tokens.at[:, 0].set(BOS)
  context = setup.apply({"params": setup.params}, setup.images,
                        method="encode_image")[2]
  want = setup.apply({"params": setup.params}, tokens, context, method="decode")
  got = jax.jit(lambda p, x, t: cached_logits(setup.model, p, x, t))(
      setup.params, setup.images, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def ends(tokens):
  """First EOS/PAD position after BOS per row (L if none)."""
  return test_generate.stop_positions(np.asarray(tokens))


def test_cached_greedy_equals_uncached(setup):
  """Token for token, with captions ending at different steps."""
  stops = set()
  for amount in (0.0, 0.5, 1.0, 1.5, 2.0, 4.0):
    params = with_end_bias(setup.params, amount)
    want = np.asarray(setup.uncached(params, setup.images))
    got = np.asarray(setup.greedy(params, setup.images))
    np.testing.assert_array_equal(got, want)
    stops |= set(ends(got))
  assert got.dtype == np.int32 and got.shape == (B, L)
  if "bias" in setup.params["vocab_proj"]:
    assert len(stops) > 1, stops  # Full-length captions and ones ending early.


def test_captions_are_not_trivial(plain):
  got = np.asarray(plain.greedy(plain.params, plain.images))
  assert len(set(got[:, 1:].ravel().tolist())) > 2, got


# --------------------------------------------------------- beam search, Markov LM


def markov_step(table):
  """A step function over a next-token logits table [V, V] indexed by the last token
  (state: unused, a [rows] zero vector that beam search reorders)."""
  table = jnp.asarray(table, jnp.float32)
  first = lambda tokens: (table[tokens], jnp.zeros(tokens.shape, jnp.float32))
  step = lambda state, tokens, t: (table[tokens], state)
  return first, step


def markov_logp(table, seq):
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table, jnp.float32), axis=-1))
  return sum(logp[a, b] for a, b in zip(seq[:-1], seq[1:]))


def gnmt(n, alpha):
  return ((5.0 + n) / 6.0) ** alpha


def brute_force(table, max_len, alpha):
  """Best (sequence, score) over every caption up to `max_len` tokens, a plain loop."""
  vocab = len(table)
  best = (None, -math.inf)
  for n in range(1, max_len):  # Generated tokens.
    for words in itertools.product(range(vocab), repeat=n):
      if any(w in (EOS, PAD) for w in words[:-1]):
        continue
      if n < max_len - 1 and words[-1] not in (EOS, PAD):
        continue  # Unfinished: only at full length.
      seq = (BOS,) + words
      score = markov_logp(table, seq) / gnmt(n, alpha)
      if score > best[1]:
        best = (seq, score)
  return best


def padded(seq, max_len):
  return list(seq) + [PAD] * (max_len - len(seq))


def markov_table(seed, vocab=5, end_bias=0.0):
  rng = np.random.default_rng(seed)
  table = 1.5 * rng.normal(size=(vocab, vocab))
  table[:, EOS] += end_bias
  return table


@pytest.fixture(scope="module")
def markov_beam():
  """Jitted beam search over a Markov table: (table, beam size, alpha) -> (seq, score)."""
  fns = {}

  def run(table, beam_size, alpha, max_len=5):
    key = (beam_size, alpha, max_len)
    if key not in fns:
      def fn(table):
        first, step = markov_step(table)
        return beam_search.beam_search(first, step, 1, beam_size, max_len, BOS, EOS,
                                       PAD, alpha)
      fns[key] = jax.jit(fn)
    seqs, scores = fns[key](jnp.asarray(table, jnp.float32))
    return np.asarray(seqs[0]), float(scores[0])
  return run


@pytest.mark.parametrize("alpha", [pytest.param(0.0, marks=pytest.mark.slow), 0.6,
                                   pytest.param(2.0, marks=pytest.mark.slow)])
def test_beam_equals_brute_force(markov_beam, alpha):
  """With every hypothesis kept (5 words, 4 positions: beam 64), beam search is exact."""
  for seed in range(4):
    table = markov_table(seed, end_bias=0.5)
    want, want_score = brute_force(table, 5, alpha)
    got, score = markov_beam(table, 64, alpha)
    assert got.tolist() == padded(want, 5), (seed, got, want)
    assert score == pytest.approx(want_score, abs=1e-5)


def markov_greedy(table, max_len):
  seq = [BOS]
  while len(seq) < max_len and (len(seq) == 1 or seq[-1] not in (EOS, PAD)):
    seq.append(int(np.argmax(table[seq[-1]])))
  return seq


def test_beam_size_one_is_greedy(markov_beam):
  """At length_penalty 0 (with a positive one a longer continuation of an ended
  greedy caption can outscore it: beam_search.py)."""
  for seed in range(6):
    table = markov_table(seed + 10, end_bias=0.8)
    greedy = markov_greedy(table, 5)
    got, score = markov_beam(table, 1, 0.0)
    assert got.tolist() == padded(greedy, 5), (seed, got, greedy)
    assert score == pytest.approx(markov_logp(table, greedy), abs=1e-5)


@pytest.mark.slow
def test_wider_beams_score_at_least_greedy(markov_beam):
  for seed in range(6):
    table = markov_table(seed + 10, end_bias=0.8)
    greedy_score = markov_logp(table, markov_greedy(table, 5))
    for k in (2, 4):
      assert markov_beam(table, k, 0.0)[1] >= greedy_score - 1e-6


def test_length_penalty_changes_the_pick(markov_beam):
  """From BOS: EOS p=.5, word 3 p=.45; after 3: EOS p=.95. Log-prob prefers [EOS]
  (-0.69 vs -0.85); GNMT alpha 2 divides the longer one by (7/6)^2 -> -0.63 wins."""
  probs = np.full((5, 5), 0.01)
  probs[BOS] = [0.02, 0.01, 0.5, 0.45, 0.02]
  probs[3] = [0.01, 0.01, 0.95, 0.02, 0.01]
  table = np.log(probs / probs.sum(axis=1, keepdims=True))
  assert markov_beam(table, 4, 0.0)[0].tolist() == [BOS, EOS, PAD, PAD, PAD]
  assert markov_beam(table, 4, 2.0)[0].tolist() == [BOS, 3, EOS, PAD, PAD]


# ------------------------------------------------------- beam search and sampling, CoCa


def model_score(s, params, seqs, alpha=0.0):
  """GNMT-normalised log-probabilities of `seqs` [N, L] by the uncached decoder."""
  context = s.apply({"params": params}, s.images, method="encode_image")[2]
  logp = np.asarray(jax.nn.log_softmax(s.apply({"params": params}, jnp.asarray(seqs),
                                               context, method="decode"), axis=-1))
  out = []
  for i, (seq, stop) in enumerate(zip(seqs, ends(seqs))):
    n = min(stop, L - 1)
    out.append(sum(logp[i, t, seq[t + 1]] for t in range(n)) / gnmt(n, alpha))
  return np.asarray(out)


ALPHA = 0.6  # The default length penalty.


def model_beam(plain, beam_size, alpha):
  """(params with an EOS bias, so some captions end early; the beam search's
  (sequences, scores))."""
  m = plain.model
  fn = jax.jit(lambda p, x: kv_decode.beam(m, p, x, L, BOS, EOS, PAD, beam_size, alpha,
                                           return_scores=True))
  params = with_end_bias(plain.params, 2.0)
  seqs, scores = fn(params, plain.images)
  return params, np.asarray(seqs), np.asarray(scores)


@pytest.mark.slow
def test_model_beam_one_is_greedy(plain):
  params, beams, _ = model_beam(plain, 1, 0.0)
  greedy = np.asarray(plain.greedy(params, plain.images))
  assert len(set(ends(greedy))) > 1, greedy  # Ends at different steps.
  np.testing.assert_array_equal(beams, greedy)


def test_model_beam_scores_are_the_uncached_scores(plain):
  """Beam 3: each returned score = the uncached decoder's log-probability of the
  returned caption / GNMT penalty. Beams swap rows (the best hypothesis descends from
  different beams over the steps), so a cache not reordered with them scores the
  captions with another hypothesis' keys/values and fails this."""
  params, beams, scores = model_beam(plain, 3, ALPHA)
  np.testing.assert_allclose(scores, model_score(plain, params, beams, ALPHA),
                             atol=1e-5, rtol=0)
  greedy = np.asarray(plain.greedy(params, plain.images))
  assert not np.array_equal(beams, greedy)  # The search matters here.
  for row, stop in zip(beams, ends(beams)):
    assert np.all(row[stop + 1:] == PAD) and row[0] == BOS


@pytest.fixture(scope="module")
def sampler(plain):
  m = plain.model
  return jax.jit(lambda p, x, key, top_p, temperature, max_len: kv_decode.sample(
      m, p, x, key, max_len, BOS, EOS, PAD, top_p, temperature),
                 static_argnames=("max_len",))


@pytest.mark.slow
def test_sampling_tiny_top_p_is_greedy_and_keys_are_deterministic(plain, sampler):
  p, x = plain.params, plain.images
  greedy = np.asarray(plain.greedy(p, x))
  for seed in range(3):
    got = sampler(p, x, jax.random.key(seed), 1e-6, 1.0, max_len=L)
    np.testing.assert_array_equal(got, greedy)
  a = np.asarray(sampler(p, x, jax.random.key(5), 1.0, 2.0, max_len=L))
  b = np.asarray(sampler(p, x, jax.random.key(5), 1.0, 2.0, max_len=L))
  c = np.asarray(sampler(p, x, jax.random.key(6), 1.0, 2.0, max_len=L))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, greedy)


@pytest.mark.slow
def test_sampled_first_tokens_follow_the_softmax(plain, monkeypatch):
  """top_p 1, temperature 1: the first token's frequencies over 4096 draws match the
  model's softmax (a loose chi-square bound: 99.9% quantile at V - 1 = 19 dof ~ 43).
  One image is encoded and its context repeated (`kv_decode.encode` patched)."""
  n, encode = 4096, kv_decode.encode
  monkeypatch.setattr(kv_decode, "encode", lambda model, params, images: jnp.repeat(
      encode(model, params, plain.images[:1]), n, axis=0))
  x = jnp.zeros((n, 1, 1, 3), jnp.float32)  # Only its batch size is read.
  m = plain.model
  tokens = np.asarray(jax.jit(lambda p, x: kv_decode.sample(
      m, p, x, jax.random.key(0), 2, BOS, EOS, PAD, 1.0, 1.0))(plain.params, x))
  counts = np.bincount(tokens[:, 1], minlength=V)
  context = plain.apply({"params": plain.params}, plain.images[:1],
                        method="encode_image")[2]
  logits = plain.apply({"params": plain.params}, jnp.full((1, 1), BOS, jnp.int32),
                       context, method="decode")[0, 0]
  expected = n * np.asarray(jax.nn.softmax(logits))
  assert expected.max() < 0.9 * n  # Not degenerate: several tokens are likely.
  chi2 = float(np.sum((counts - expected) ** 2 / np.maximum(expected, 1e-3)))
  assert chi2 < 43.8, (chi2, counts, expected.round(1))


def test_nucleus_filter():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  keep = lambda p: np.isfinite(np.asarray(kv_decode.nucleus_filter(logits, p)))[0]
  assert keep(0.7).tolist() == [False, True, False, True]
  assert keep(0.85).tolist() == [False, True, True, True]
  assert keep(1e-9).tolist() == [False, True, False, False]
  assert keep(1.0).all()


def test_options_are_checked():
  ok = dict(method="beam", beam_size=2, length_penalty=0.6, top_p=0.9, temperature=1.0,
            max_len=8, context_length=8)
  generate.check_options(**ok)
  generate.check_options(**dict(ok, temperature=1e-3, seed=2**31 - 1, max_len=0))
  for key, bad in [("method", "topk"), ("beam_size", 0), ("top_p", 0.0),
                   ("temperature", 0.0), ("temperature", 1e-4), ("max_len", 9),
                   ("max_len", 1), ("length_penalty", -1.0), ("length_penalty", 1e9),
                   ("seed", -1), ("seed", 2**31), ("top_p", float("nan"))]:
    with pytest.raises(errors.ConfigError, match=key if key != "method" else "topk"):
      generate.check_options(**dict(ok, **{key: bad}))
