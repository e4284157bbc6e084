"""Greedy caption generation against a naive token-by-token reference (tiny CoCa)."""
import types
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import models
from vlp_jax.config import default_config
from vlp_jax.models import generate
from vlp_jax.train import predict

B = 4  # Images.
S = 16  # Image size (4x4 patches).
V = 20  # Vocabulary.
L = 8  # Context length = generated length.
PAD, BOS, EOS = 0, 1, 2


def tiny_coca_config():
  c = default_config().model
  c.name = "coca"
  c.embed_dim = 16
  c.image.update(variant="", width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=4)
  c.text.update(vocab_size=V, width=24, depth=1, mlp_dim=48, num_heads=4,
                context_length=L)
  c.decoder.update(depth=1, num_queries=4)
  return c


def random_params(model, images, seed):
  """Random values for every parameter (shapes from `model.init` traced abstractly).

  Each leaf draws from its own stream (seeded by its path), so adding or removing a
  parameter elsewhere does not change the others.
  """
  batch = {"image": images, "text": jnp.zeros((images.shape[0], L), jnp.int32)}
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])

  def fill(path, leaf):
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    shape = leaf.shape
    if len(shape) == 2:  # Kernels and embeddings.
      value = rng.normal(size=shape) / np.sqrt(shape[0])
    elif len(shape) == 3:  # Positions, attention-pool probes.
      value = 0.5 * rng.normal(size=shape)
    elif path[-1].key == "scale":  # LayerNorm scales.
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:  # Biases.
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def with_vocab_bias(params, adds):
  """`params` with `adds` {token id: amount} added to the vocabulary projection bias."""
  bias = params["vocab_proj"]["bias"]
  for token, amount in adds.items():
    bias = bias.at[token].add(amount)
  return dict(params, vocab_proj=dict(params["vocab_proj"], bias=bias))


def naive_greedy(apply, params, images, max_len, bos_id, eos_id, pad_id):
  """Grows each caption one token at a time, decoding the unpadded sequence.

  `apply` is (a jitted) `model.apply` with `method` static.
  """
  variables = {"params": params}
  _, _, context = apply(variables, images, method="encode_image")
  out = np.full((images.shape[0], max_len), pad_id, np.int32)
  for i in range(images.shape[0]):
    seq = [bos_id]
    while len(seq) < max_len:
      logits = apply(variables, jnp.asarray([seq], jnp.int32), context[i:i + 1],
                     method="decode")
      assert logits.shape == (1, len(seq), V)
      seq.append(int(np.argmax(logits[0, -1])))
      if seq[-1] in (eos_id, pad_id):
        break
    out[i, :len(seq)] = seq
  return out


def stop_positions(tokens):
  """Index of the first EOS/PAD after BOS in each row (L if none)."""
  stops = []
  for row in tokens:
    hits = [t for t in range(1, len(row)) if row[t] in (EOS, PAD)]
    stops.append(hits[0] if hits else len(row))
  return stops


@pytest.fixture(scope="module")
def setup():
  model = models.build_model(tiny_coca_config())
  images = jnp.asarray(np.random.default_rng(0).normal(size=(B, S, S, 3)), jnp.float32)
  params = random_params(model, images, seed=0)
  # Jitted once per sequence length, shared by the tests.
  apply = jax.jit(model.apply, static_argnames="method")
  # As `train/predict.py` uses it: jitted, with the token ids fixed.
  gen = jax.jit(lambda p, x: generate.greedy_generate(
      model, p, x, max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD))
  return apply, gen, images, params


def check_against_reference(setup, params):
  apply, gen, images, _ = setup
  want = naive_greedy(apply, params, images, L, BOS, EOS, PAD)
  got = gen(params, images)
  assert got.shape == (B, L) and got.dtype == jnp.int32
  got = np.asarray(got)
  np.testing.assert_array_equal(got, want)
  assert np.all(got[:, 0] == BOS)
  for row, stop in zip(got, stop_positions(got)):
    assert np.all(row[stop + 1:] == PAD), row  # Only padding after the first EOS/PAD.
  return got


def test_greedy_matches_naive_reference(setup):
  """Full-length captions (EOS and PAD suppressed)."""
  params = with_vocab_bias(setup[3], {EOS: -100.0, PAD: -100.0})
  got = check_against_reference(setup, params)
  assert stop_positions(got) == [L] * B
  # The captions are not trivial: several distinct tokens, different per image.
  assert len({tuple(row) for row in got}) > 1, got
  assert len(set(got[:, 1:].ravel().tolist())) > 2, got


@pytest.mark.parametrize("token,other", [(EOS, PAD), (PAD, EOS)], ids=["eos", "pad"])
def test_greedy_stops_at_eos_or_pad(setup, token, other):
  """Captions that end on `token` at different steps: padding follows."""
  apply, _, images, params = setup
  # Raise the `token` logit (the `other` one suppressed) until, by the reference,
  # some caption ends on it after a few tokens while another one runs to the end.
  for boost in np.arange(0.0, 10.0, 0.25):
    biased = with_vocab_bias(params, {token: boost, other: -100.0})
    want = naive_greedy(apply, biased, images, L, BOS, EOS, PAD)
    stops = stop_positions(want)
    if L in stops and any(1 < s < L - 1 for s in stops):
      break
  else:
    pytest.fail(f"No bias of token {token} gives captions ending at different steps.")
  got = check_against_reference(setup, biased)
  assert all(got[i, s] == token for i, s in enumerate(stop_positions(got)) if s < L)


def test_predictors_generate_only_for_captioners():
  """`generate` comes with families that have encode_image + decode (interface.py)."""
  tokenizer = types.SimpleNamespace(tokenize=None, decode=None, bos_id=BOS, eos_id=EOS,
                                    pad_id=PAD)
  coca = models.build_model(tiny_coca_config())
  assert set(predict.make_predict_fns(coca, tokenizer, L)) == {
      "embed_image", "embed_text", "generate", "tokenize", "detokenize"}
  c = tiny_coca_config()
  c.name = "two_tower"
  assert "generate" not in predict.make_predict_fns(models.build_model(c), tokenizer, L)
