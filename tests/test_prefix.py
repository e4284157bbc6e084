"""Prefix conditioning (Saito et al., arXiv 2206.01125): one learned prefix per data
type in the text tower, inserted after BOS, chosen by batch['data_type'].

A tiny two-tower model (text width 24, depth 1, context 8, token_embed_dim 8) is
built once, text tower only; the layout is checked on the pure `text.insert_prefix`
with "embeddings" that carry the token ids.
"""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import errors, models
from vlp_jax.config import default_config
from vlp_jax.models import text
from vlp_jax.train import predict

P = 2   # Prefix vectors per data type.
L = 8   # Context length.
V = 20
# Right-padded BOS .. EOS rows: short, exactly full (n = L), one word, all padding.
TOKENS = np.array([[1, 5, 7, 2, 0, 0, 0, 0],
                   [1, 3, 4, 9, 11, 6, 8, 2],
                   [1, 2, 0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0, 0]], np.int32)


def tiny_config(prefix=True, **model):
  c = default_config().model
  c.embed_dim = 16
  c.token_embed_dim = 8  # FILIP's token outputs cover the prefixed sequence
  c.image.update(variant="", width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=4)
  c.text.update(vocab_size=V, width=24, depth=1, mlp_dim=48, num_heads=4,
                context_length=L, prefix_conditioning=prefix, prefix_length=P)
  c.update(model)
  return c


@pytest.fixture(scope="module")
def tower():
  """(model, boxed variables, params with a N(0, 1) prefix table, jitted text tower
  apply(tokens, data_type) -> (pooled, feats))."""
  cfg = tiny_config()
  model = models.build_model(cfg)
  # Text only: nothing here needs the image tower.
  variables = jax.jit(model.init)(jax.random.key(0), {"text": jnp.asarray(TOKENS)})
  # A larger table than the N(0, 0.02) init, so the prefixes' effects are clear.
  params = nn.unbox(variables["params"])
  params["txt"]["prefix_embedding"] = jax.random.normal(
      jax.random.key(1), params["txt"]["prefix_embedding"].shape)
  apply = jax.jit(lambda toks, dt: model.apply(
      {"params": params}, toks, dt, method=lambda m, t, d: m.txt(t, data_type=d)))
  return model, variables, params, apply


def _layout(tokens, context_length=L, p=P):
  """insert_prefix on 1-wide "embeddings" that carry the token id; prefix = -1..-p."""
  x = jnp.asarray(tokens, jnp.float32)[..., None]
  prefix = -jnp.broadcast_to(jnp.arange(1, p + 1, dtype=jnp.float32)[None, :, None],
                             (len(tokens), p, 1))
  layout = jax.jit(lambda x, pre, t: (text.insert_prefix(x, pre, t, context_length),
                                      text.sequence_mask(t, p, context_length)))
  out, mask = layout(x, prefix, jnp.asarray(tokens))
  return np.asarray(out)[..., 0], np.asarray(mask)


def test_prefix_goes_after_bos_and_eos_is_never_cut():
  out, mask = _layout(TOKENS)
  assert out.shape == mask.shape == (4, L)  # min(L + P, context_length)
  # Short row: BOS, the prefix, the words, EOS; the padding stays padding.
  np.testing.assert_array_equal(out[0][mask[0]], [1, -1, -2, 5, 7, 2])
  # Full row (n = L): the last P words before EOS give way; EOS stays last.
  np.testing.assert_array_equal(out[1][mask[1]], [1, -1, -2, 3, 4, 9, 11, 2])
  assert mask[1].all()
  np.testing.assert_array_equal(out[2][mask[2]], [1, -1, -2, 2])
  assert not mask[3].any()  # All padding stays all padding.
  # Shorter inputs leave room: plain concatenation, T = L' + P, nothing dropped.
  out, mask = _layout(TOKENS[:, :5])
  assert out.shape == (4, 5 + P)
  np.testing.assert_array_equal(out[0][mask[0]], [1, -1, -2, 5, 7, 2])
  np.testing.assert_array_equal(mask.sum(1), [6, 7, 4, 0])


def test_sequence_mask_without_prefix_is_the_padding_mask():
  np.testing.assert_array_equal(text.sequence_mask(jnp.asarray(TOKENS)), TOKENS != 0)


def test_prefix_table_is_a_learned_parameter_per_data_type(tower):
  model, variables, _, _ = tower
  table = variables["params"]["txt"]["prefix_embedding"]
  assert table.value.shape == (text.NUM_DATA_TYPES, P, 24)
  assert table.names == (None, None, "embed")
  assert 0.005 < float(jnp.std(table.value)) < 0.05  # N(0, 0.02)
  # Without prefix conditioning there is no table and the text is unchanged.
  plain = models.build_model(tiny_config(prefix=False))
  pv = jax.eval_shape(plain.init, jax.random.key(0), {"text": jnp.asarray(TOKENS)})
  assert "prefix_embedding" not in pv["params"]["txt"]


def test_data_type_selects_the_prefix_and_eos_is_pooled(tower):
  _, _, _, apply = tower
  toks = jnp.asarray(TOKENS[:3])
  caption = apply(toks, jnp.zeros(3, jnp.int32))
  classif = apply(toks, jnp.ones(3, jnp.int32))
  assert np.abs(np.asarray(caption[0]) - np.asarray(classif[0])).min() > 1e-4
  # Mixed per example.
  mixed = apply(toks, jnp.array([0, 1, 0], jnp.int32))
  np.testing.assert_allclose(mixed[0][1], classif[0][1], atol=1e-6)
  np.testing.assert_allclose(mixed[0][0], caption[0][0], atol=1e-6)
  # 'eos' pooling reads the last real position of the prefixed sequence.
  mask = np.asarray(text.sequence_mask(toks, P, L))
  for i in range(3):
    last = np.nonzero(mask[i])[0].max()
    np.testing.assert_allclose(caption[0][i], caption[1][i, last], atol=1e-6)
  # Causal: BOS (position 0) sees no prefix; the words after it do.
  np.testing.assert_allclose(caption[1][:, 0], classif[1][:, 0], atol=1e-6)


def test_eos_survives_at_full_length(tower):
  """A full-length row pools at its EOS: changing the EOS id changes the embedding,
  changing a dropped word (the last before EOS) does not."""
  _, _, _, apply = tower
  full = TOKENS[1:2]
  other_eos = full.copy()
  other_eos[0, -1] = 13
  dropped = full.copy()
  dropped[0, -2] = 17  # words at L-1-P .. L-2 give way to the prefix
  out = np.asarray(apply(jnp.asarray(np.concatenate([full, other_eos, dropped])),
                         jnp.zeros(3, jnp.int32))[0])
  assert np.abs(out[0] - out[1]).max() > 1e-4
  np.testing.assert_allclose(out[0], out[2], atol=1e-6)


def test_padding_does_not_change_the_prefixed_embedding(tower):
  _, _, _, apply = tower
  rows = TOKENS[[0, 2, 0]]  # short rows: with their prefix they fit in 7 positions
  dt = jnp.array([0, 1, 1], jnp.int32)
  np.testing.assert_allclose(apply(jnp.asarray(rows[:, :5]), dt)[0],
                             apply(jnp.asarray(rows), dt)[0], atol=1e-5)


def test_two_tower_passes_data_type_and_evaluation_uses_the_caption_prefix(tower):
  model, _, params, _ = tower
  batch = {"text": jnp.asarray(TOKENS[:3])}
  run = jax.jit(lambda b: model.apply({"params": params}, b))
  out = run(dict(batch, data_type=jnp.zeros(3, jnp.int32)))
  caption = out["text_emb"]
  classif = run(dict(batch, data_type=jnp.ones(3, jnp.int32)))["text_emb"]
  # Token outputs are those of the prefixed sequence (prefix positions count as real).
  assert out["text_token_emb"].shape == (3, L, 8)
  np.testing.assert_array_equal(out["text_token_mask"],
                                text.sequence_mask(batch["text"], P, L))
  assert np.abs(np.asarray(caption) - np.asarray(classif)).max() > 1e-3
  # What evaluators embed with (and a batch without 'data_type' gets): the caption
  # prefix; or a chosen one.
  fns = predict.make_predict_fns(model, types.SimpleNamespace(decode=None), L)
  with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))):
    np.testing.assert_allclose(fns["embed_text"](params, batch["text"]), caption,
                               atol=1e-6)
    np.testing.assert_allclose(fns["embed_text"](params, batch["text"], data_type=1),
                               classif, atol=1e-6)


def test_families_without_prefix_conditioning_refuse_it():
  c = tiny_config(name="coca", token_embed_dim=0)
  with pytest.raises(errors.ConfigError,
                     match=r"text.prefix_conditioning is set, but model 'coca'.*"
                           r"two_tower.*prefix_conditioning=False"):
    models.check_config(c)
  models.check_config(tiny_config())  # two_tower implements it
  models.check_config(tiny_config(prefix=False, name="coca", token_embed_dim=0))
