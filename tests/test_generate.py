"""Greedy caption generation against a naive token-by-token reference (tiny CoCa)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import models
from vlp_jax.config import default_config
from vlp_jax.models import generate

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
  """Random values for every parameter of `model` (shapes from a traced init)."""
  abstract = nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0), {"image": images,
                                      "text": jnp.zeros((images.shape[0], L), jnp.int32)})["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    shape = leaf.shape
    if len(shape) == 2:
      value = rng.normal(size=shape) / np.sqrt(shape[0])
    elif len(shape) == 3:
      value = 0.5 * rng.normal(size=shape)
    elif path[-1].key == "scale":
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def naive_greedy(apply, params, images, max_len, bos_id, eos_id, pad_id):
  """Grows each caption one token at a time on the unpadded sequence.

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


@pytest.fixture(scope="module")
def setup():
  model = models.build_model(tiny_coca_config())
  images = jnp.asarray(np.random.default_rng(0).normal(size=(B, S, S, 3)), jnp.float32)
  params = random_params(model, images, seed=7)
  # Jitted (once per sequence length) for speed; shared by the tests.
  apply = jax.jit(model.apply, static_argnames="method")
  return model, apply, images, params


def _stop_positions(tokens):
  """Index of the first EOS/PAD after BOS in each row (L if none)."""
  stops = []
  for row in tokens:
    hits = [t for t in range(1, len(row)) if row[t] in (EOS, PAD)]
    stops.append(hits[0] if hits else len(row))
  return stops


def _check_against_reference(model, apply, params, images):
  """Jitted greedy generation (as `train/predict.py` uses it) vs. the reference."""
  want = naive_greedy(apply, params, images, L, BOS, EOS, PAD)
  got = jax.jit(lambda p, x: generate.greedy_generate(
      model, p, x, max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD))(params, images)
  assert got.shape == (B, L) and got.dtype == jnp.int32
  got = np.asarray(got)
  np.testing.assert_array_equal(got, want)
  assert np.all(got[:, 0] == BOS)
  for row, stop in zip(got, _stop_positions(got)):
    assert np.all(row[stop + 1:] == PAD)  # Only padding after the first EOS/PAD.
  return got


def test_greedy_matches_naive_reference(setup):
  model, apply, images, params = setup
  got = _check_against_reference(model, apply, params, images)
  # The captions are not trivial: several distinct tokens, different per image.
  assert len({tuple(row) for row in got}) > 1
  assert len(set(got[:, 1:].ravel().tolist())) > 3
  assert _stop_positions(got) == [L] * B  # This random model never stops by itself.


@pytest.mark.parametrize("token,boost", [(EOS, 0.5), (PAD, 2.0)])
def test_greedy_stops_at_eos_or_pad(setup, token, boost):
  model, apply, images, params = setup
  # Push the EOS (or PAD) logit up so that some captions end early and others do not.
  biased = dict(params)
  biased["vocab_proj"] = dict(params["vocab_proj"])
  biased["vocab_proj"]["bias"] = params["vocab_proj"]["bias"].at[token].add(boost)
  got = _check_against_reference(model, apply, biased, images)
  stops = _stop_positions(got)
  # At least one caption ends early on `token`, with tokens before it and padding
  # after it, while another one runs on.
  assert any(1 < s < L - 1 and got[i, s] == token for i, s in enumerate(stops)), got
  assert L in stops, got
