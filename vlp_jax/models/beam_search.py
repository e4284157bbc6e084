"""Beam search with a length penalty, over any step function (static shapes, jits).

Hypotheses are ranked by log p(tokens | image) / lp(n), with n the generated tokens
(the end token included) and the GNMT length penalty (Wu et al., 2016, as t5x and
flax's beam search use it):

    lp(n) = ((5 + n) / 6) ** length_penalty

`length_penalty` 0 ranks by the log-probability alone; larger values favour longer
captions. (HF `transformers` divides by n ** length_penalty instead; the GNMT form is
gentler at short lengths, where captions live.)

Each step keeps the `beam_size` best unfinished hypotheses; a candidate that ends
(EOS, or the padding id, which also ends a caption as in greedy decoding) joins the
finished set only when it ranks among the `beam_size` best candidates of its step
(as HF's `BeamSearchScorer`), so beam size 1 is greedy decoding at length_penalty 0
(with a positive one, a longer continuation of an ended greedy caption can outscore
it).
The search stops when no unfinished hypothesis can beat the best finished one (only
the best is returned), or at `max_len`; hypotheses still unfinished there compete
with their score so far.
"""
import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def length_penalty_divisor(length, alpha: float):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha (float32)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather(x, index):
  """x [B, N, ...], index [B, M] -> [B, M, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def beam_search(first, step, batch: int, beam_size: int, max_len: int, bos_id: int,
                eos_id: int, pad_id: int = 0, length_penalty: float = 0.0,
                reorder=None):
  """-> (best sequences int32 [batch, max_len], their scores float32 [batch]).

  `first(tokens [batch * beam_size]) -> (logits [batch * beam_size, V], state)` runs
  position 0 (BOS); `step(state, tokens, t) -> (logits, state)` position t. Rows are
  example-major (row b * beam_size + k is beam k of example b); every leaf of `state`
  (the decoder's KV cache) has the rows on axis 0 and is reordered with the beams by
  `reorder(state, rows)` (default: every leaf taken at `rows`). Sequences: BOS, the
  tokens, the end token, then `pad_id`.
  """
  k, length = beam_size, max_len
  seqs = jnp.full((batch, k, length), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  # One live beam at the start (the others would duplicate it).
  logp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  fin_seqs, fin_scores = seqs, jnp.full((batch, k), NEG_INF, jnp.float32)
  pen = lambda n: length_penalty_divisor(n, length_penalty)
  reorder = reorder or (lambda state, rows: jax.tree.map(
      lambda c: jnp.take(c, rows, axis=0), state))

  def expand(t, logits, state, seqs, logp, fin_seqs, fin_scores):
    """Position t's logits -> the beams and finished set with tokens at t + 1."""
    vocab = logits.shape[-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    cand = (logp[:, :, None] + lp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
    cand_logp, idx = jax.lax.top_k(cand, 2 * k)
    origin, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    cand_seqs = jax.lax.dynamic_update_slice(
        _gather(seqs, origin), tok[:, :, None], (0, 0, t + 1))
    ends = (tok == eos_id) | (tok == pad_id)
    # Finished: ending candidates among the step's best `k`.
    new = jnp.where(ends & (jnp.arange(2 * k) < k), cand_logp / pen(t + 1), NEG_INF)
    fin_scores, i = jax.lax.top_k(jnp.concatenate([fin_scores, new], axis=1), k)
    fin_seqs = _gather(jnp.concatenate([fin_seqs, cand_seqs], axis=1), i)
    # Live: the best `k` candidates that do not end.
    logp, i = jax.lax.top_k(jnp.where(ends, NEG_INF, cand_logp), k)
    seqs = _gather(cand_seqs, i)
    rows = (jnp.arange(batch)[:, None] * k + _gather(origin, i)).reshape(-1)
    state = reorder(state, rows)
    return state, seqs, logp, fin_seqs, fin_scores

  def done(t, logp, fin_scores):
    """Every example: no live beam (generated length t + 1 now, at most
    max_len - 1) can still beat its best finished hypothesis, the one returned
    (hypotheses finishing later, or left unfinished, score at most `bound`; ties keep
    the earlier one)."""
    best = logp[:, 0]  # Log-probabilities only fall as a hypothesis grows.
    bound = jnp.maximum(best / pen(t + 1), best / pen(length - 1))
    return jnp.all(bound <= fin_scores[:, 0])

  logits, state = first(seqs[:, :, 0].reshape(-1))
  carry = (jnp.int32(0),) + expand(0, logits, state, seqs, logp, fin_seqs, fin_scores)

  def cond(carry):
    t, _, _, logp, _, fin_scores = carry
    return (t + 1 < length - 1) & ~done(t, logp, fin_scores)

  def body(carry):
    t, state, seqs, logp, fin_seqs, fin_scores = carry
    t = t + 1
    logits, state = step(state, seqs[:, :, t].reshape(-1), t)
    return (t,) + expand(t, logits, state, seqs, logp, fin_seqs, fin_scores)

  t, _, seqs, logp, fin_seqs, fin_scores = jax.lax.while_loop(cond, body, carry)
  # Unfinished hypotheses (t + 1 generated tokens) compete with the finished ones.
  scores = jnp.concatenate([fin_scores, logp / pen(t + 1)], axis=1)
  best = jnp.argmax(scores, axis=1)
  out = _gather(jnp.concatenate([fin_seqs, seqs], axis=1), best[:, None])[:, 0]
  return out, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
