"""Tests for the models: output contracts, parameter layout and counts, references.

Tiny models (width 32/24, depth 1, 16x16 images with 4x4 patches, vocab 20, context 8)
are built once per module; the published recipes are only traced with
`jax.eval_shape`, so nothing big is allocated.
"""
import importlib
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax import models
from vlp_jax import sharding
from vlp_jax.config import default_config
from vlp_jax.models import builders, layers, text, vit

B = 2  # Batch.
S = 16  # Image size.
P = 4  # Patch size.
N = (S // P) ** 2  # Image tokens.
W_IMG = 32
W_TXT = 24
V = 20  # Vocabulary.
L = 8  # Context length.
D = 16  # Embedding dimension.
Q = 4  # CoCa decoder queries.

EXPECTED_OUT_KEYS = {"image_emb", "image_tokens", "text_emb", "text_tokens",
                     "image_local_emb", "text_local_emb", "text_local_mask",
                     "logit_scale"}


# ----------------------------------------------------------------------------- helpers


def tiny_config(name="two_tower", dtype="float32", image=None, txt=None, **model):
  """A `config.model` for a tiny model; `image`/`txt` update the tower sub-configs."""
  c = default_config().model
  c.name = name
  c.dtype = dtype
  c.embed_dim = D
  c.image.update(variant="", width=W_IMG, depth=1, mlp_dim=64, num_heads=4,
                 patch_size=P, pool="cls")
  c.text.update(vocab_size=V, width=W_TXT, depth=1, mlp_dim=48, num_heads=4,
                context_length=L, causal=True, pool="eos")
  c.decoder.update(depth=1, num_queries=Q)
  c.image.update(image or {})
  c.text.update(txt or {})
  c.update(model)
  return c


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, S, S, 3)).astype(np.float32)
  # Right-padded [BOS, ..., EOS, PAD...] rows of different lengths (BOS 1, EOS 2).
  tokens = np.array([[1, 5, 7, 2, 0, 0, 0, 0],
                     [1, 3, 4, 9, 11, 6, 2, 0]], np.int32)
  return {"image": jnp.asarray(images), "text": jnp.asarray(tokens)}


def random_tokens(rng, shape):
  """Tokens without any PAD (ids 1..V-1)."""
  return rng.integers(1, V, size=shape).astype(np.int32)


def init_model(cfg, batch, seed=0):
  model = models.build_model(cfg)
  variables = model.init(jax.random.key(seed), batch)
  return model, variables


def random_model(cfg, batch, seed=0):
  """(model, boxed abstract variables, random concrete variables).

  The abstract variables are `model.init` traced with `jax.eval_shape` (they carry the
  logical axis names). Concrete parameters are random, biases and LayerNorms included
  (cheaper than a real init on CPU, and no parameter is trivially zero or one), except
  the temperature / bias, which come from a real init of the scale module.
  """
  model = models.build_model(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(seed), batch)

  def fill(path, leaf):
    # One stream per leaf: adding a parameter elsewhere does not change this one.
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    shape, name = leaf.shape, path[-1].key
    if len(shape) == 2:  # Dense kernels and embeddings: unit-variance outputs.
      value = rng.normal(size=shape) / np.sqrt(shape[0])
    elif len(shape) == 3:  # Positions, class token, attention-pool probes.
      value = rng.normal(size=shape) * 0.5
    elif name == "scale":  # LayerNorm scales.
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:  # Biases.
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract["params"]))
  params["scale"] = nn.unbox(model.init(jax.random.key(seed), {})["params"]["scale"])
  return model, abstract, {"params": params}


def recipe(name):
  return importlib.import_module(f"configs.{name}").get_config()


def abstract_params(model_cfg, image_size, context_length):
  """Boxed abstract params of the model built from `model_cfg`, via `jax.eval_shape`."""
  model = models.build_model(model_cfg)
  batch = {"image": jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
           "text": jax.ShapeDtypeStruct((1, context_length), jnp.int32)}
  return jax.eval_shape(model.init, jax.random.key(0), batch)["params"]


def count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))


def max_abs_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def batch():
  return make_batch()


@pytest.fixture(scope="module")
def tt(batch):
  """(config, model, boxed abstract variables, random variables): tiny two-tower."""
  cfg = tiny_config("two_tower")
  return (cfg,) + random_model(cfg, batch)


@pytest.fixture(scope="module")
def coca(batch):
  """(config, model, boxed abstract variables, random variables): tiny CoCa."""
  cfg = tiny_config("coca")
  return (cfg,) + random_model(cfg, batch, seed=1)


@pytest.fixture(scope="module")
def tt_out(tt, batch):
  _, model, _, variables = tt
  return model.apply(variables, batch)


@pytest.fixture(scope="module")
def coca_out(coca, batch):
  _, model, _, variables = coca
  return model.apply(variables, batch)


# ------------------------------------------------------------------- output contracts


def _check_common_outputs(out, cfg):
  assert out["image_emb"].shape == (B, D)
  assert out["text_emb"].shape == (B, D)
  assert out["image_tokens"].shape == (B, N, W_IMG)
  assert out["text_tokens"].shape == (B, L, W_TXT)
  for key in ("image_emb", "text_emb"):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    # Distinct inputs give distinct embeddings (not a constant).
    assert max_abs_diff(out[key][0], out[key][1]) > 1e-3
  assert out["logit_scale"].shape == ()
  np.testing.assert_allclose(out["logit_scale"], math.exp(cfg.logit_scale_init),
                             rtol=1e-6)
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-6)


def test_two_tower_output_contract(tt, tt_out):
  _check_common_outputs(tt_out, tt[0])
  assert set(tt_out) == EXPECTED_OUT_KEYS  # No logit_bias without use_logit_bias.


def test_coca_output_contract(coca, coca_out):
  _check_common_outputs(coca_out, coca[0])
  assert set(coca_out) == EXPECTED_OUT_KEYS | {"caption_logits", "text_lm_logits"}
  assert coca_out["caption_logits"].shape == (B, L, V)
  assert coca_out["text_lm_logits"].shape == (B, L, V)
  assert np.all(np.isfinite(coca_out["caption_logits"]))


@pytest.mark.parametrize("which", ["two_tower", "coca"])
def test_single_modality_batches(which, tt, coca, tt_out, coca_out, batch):
  _, model, _, variables = tt if which == "two_tower" else coca
  full = tt_out if which == "two_tower" else coca_out
  img = model.apply(variables, {"image": batch["image"]})
  txt = model.apply(variables, {"text": batch["text"]})
  assert set(img) == {"image_emb", "image_tokens", "image_local_emb", "logit_scale"}
  # CoCa's text-only language model (no image needed) comes with any text batch.
  lm = {"text_lm_logits"} if which == "coca" else set()
  assert set(txt) == {"text_emb", "text_tokens", "text_local_emb", "text_local_mask",
                      "logit_scale"} | lm
  for out in (img, txt):
    for key, value in out.items():
      np.testing.assert_allclose(value, full[key], atol=1e-6)


@pytest.mark.parametrize("scale_init,scale_max,expected", [
    (math.log(10.0), 100.0, 10.0),
    (math.log(200.0), 100.0, 100.0),
    (math.log(1 / 0.07), 10.0, 10.0),
])
@pytest.mark.parametrize("use_bias", [False, True])
def test_logit_scale_clamp_and_bias(scale_init, scale_max, expected, use_bias):
  cfg = tiny_config(logit_scale_init=scale_init, logit_scale_max=scale_max,
                    use_logit_bias=use_bias, logit_bias_init=-10.0)
  # An empty batch creates (and returns) only the temperature / bias.
  model, variables = init_model(cfg, {})
  params = nn.unbox(variables["params"])
  np.testing.assert_allclose(params["scale"]["logit_scale"], scale_init, rtol=1e-6)
  out = model.apply(variables, {})
  assert set(out) == ({"logit_scale", "logit_bias"} if use_bias else {"logit_scale"})
  np.testing.assert_allclose(out["logit_scale"], expected, rtol=1e-6)
  if use_bias:
    assert out["logit_bias"].shape == ()
    np.testing.assert_allclose(out["logit_bias"], -10.0)
  else:
    assert "logit_bias" not in params["scale"]


# ------------------------------------------------------------- logical partitioning

KNOWN_LOGICAL_AXES = {rule[0] for rule in sharding.DEFAULT_RULES}


def _check_logically_partitioned(params):
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no axis names"
    assert isinstance(leaf.names, tuple), where
    assert len(leaf.names) == len(leaf.value.shape), (
        f"{where}: names {leaf.names} vs shape {leaf.value.shape}")
    unknown = set(leaf.names) - KNOWN_LOGICAL_AXES - {None}
    assert not unknown, f"{where}: axes {unknown} have no sharding rule"


@pytest.mark.parametrize("which", ["two_tower", "coca"])
def test_params_logically_partitioned_tiny(which, tt, coca):
  _, _, variables, _ = tt if which == "two_tower" else coca
  _check_logically_partitioned(variables["params"])
  scale = variables["params"]["scale"]["logit_scale"]
  assert scale.names == () and scale.value.shape == ()


@pytest.mark.parametrize("name", ["clip_b16", "siglip_b16", "coca_b16", "demo"])
def test_params_logically_partitioned_recipes(name):
  c = recipe(name)
  params = abstract_params(c.model, c.data.image_size, c.model.text.context_length)
  _check_logically_partitioned(params)
  for leaf in jax.tree.leaves(nn.unbox(params)):
    assert leaf.dtype == jnp.float32


# --------------------------------------------------------------------- parameter counts


def vit_param_count(width, depth, mlp_dim, patch, image_size, channels=3, cls=True):
  """Our ViT: linear patch embedding (+bias), learned positions, [CLS], pre-LN blocks."""
  n = (image_size // patch) ** 2
  patch_embedding = patch * patch * channels * width + width
  pos_embedding = n * width  # One position per patch; the class token has none.
  cls_token = width if cls else 0
  # q, k, v, out kernels; q, v, out biases (no key bias: softmax is invariant to it).
  attention = 4 * width * width + 3 * width
  mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
  block_norms = 2 * (2 * width)  # ln_attn, ln_mlp: scale and bias.
  final_norm = 2 * width
  return (patch_embedding + pos_embedding + cls_token
          + depth * (attention + mlp + block_norms) + final_norm)


def text_param_count(vocab, width, depth, mlp_dim, context):
  token_embedding = vocab * width
  pos_embedding = context * width
  attention = 4 * width * width + 3 * width
  mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
  block_norms = 2 * (2 * width)
  final_norm = 2 * width
  return (token_embedding + pos_embedding + depth * (attention + mlp + block_norms)
          + final_norm)


def test_clip_b16_param_count():
  c = recipe("clip_b16")
  params = abstract_params(c.model, c.data.image_size, c.model.text.context_length)
  assert set(params) == {"img", "img_proj", "txt", "txt_proj", "scale"}

  image_tower = count(params["img"]) + count(params["img_proj"])
  expected_image = (vit_param_count(width=768, depth=12, mlp_dim=3072, patch=16,
                                    image_size=224)
                    + 768 * 512)  # Bias-free projection to the 512-d embedding.
  assert image_tower == expected_image
  assert abs(image_tower - 86.2e6) / 86.2e6 < 0.01

  text_tower = count(params["txt"]) + count(params["txt_proj"])
  expected_text = (text_param_count(vocab=49408, width=512, depth=12, mlp_dim=2048,
                                    context=77)
                   + 512 * 512)
  assert text_tower == expected_text

  total = count(params)
  assert total == expected_image + expected_text + 1  # + the temperature.
  assert abs(total - 149.6e6) / 149.6e6 < 0.005


# ------------------------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit_images():
  return jnp.asarray(np.random.default_rng(1).normal(size=(B, S, S, 3)), jnp.float32)


def _vit(pool, **kw):
  return vit.ViT(width=W_IMG, depth=1, mlp_dim=64, num_heads=4, patch_size=P, pool=pool,
                 **kw)


@pytest.mark.parametrize("pool", ["cls", "gap", "map", "none"])
def test_vit_pools(pool, vit_images):
  module = _vit(pool)
  variables = module.init(jax.random.key(0), vit_images)
  pooled, tokens = module.apply(variables, vit_images)
  assert tokens.shape == (B, N, W_IMG)
  params = variables["params"]
  assert ("cls" in params) == (pool == "cls")
  assert ("map_head" in params) == (pool == "map")
  # A uniform image has identical patches: only the positions tell its tokens apart.
  _, uniform = module.apply(variables, jnp.ones_like(vit_images))
  assert max_abs_diff(uniform[:, 0], uniform[:, 1]) > 1e-3
  if pool == "none":
    assert pooled is None
    return
  assert pooled.shape == (B, W_IMG)
  mean = np.mean(np.asarray(tokens), axis=1)
  if pool == "gap":
    np.testing.assert_allclose(pooled, mean, atol=1e-6)
  else:
    assert max_abs_diff(pooled, mean) > 1e-3


def test_vit_unknown_pool_raises(vit_images):
  with pytest.raises(ValueError, match="Unknown pool 'avg'"):
    _vit("avg").init(jax.random.key(0), vit_images)


def test_vit_image_not_divisible_raises():
  images = jnp.zeros((1, 18, 18, 3))
  with pytest.raises(ValueError, match="not divisible by patch size 4"):
    _vit("cls").init(jax.random.key(0), images)


def test_parse_variant():
  assert vit.parse_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072,
                                           num_heads=12, patch_size=16)
  assert vit.parse_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304,
                                                num_heads=16, patch_size=14)
  assert vit.parse_variant("L") == dict(width=1024, depth=24, mlp_dim=4096,
                                        num_heads=16)
  assert vit.parse_variant("") == {}
  with pytest.raises(ValueError, match="known sizes") as err:
    vit.parse_variant("Q/16")
  for size in ("Ti", "S", "B", "L", "So400m"):
    assert repr(size) in str(err.value)


def test_tower_kwargs_variant_and_overrides():
  c = tiny_config(image=dict(variant="S/32", width=0, depth=3, mlp_dim=0, num_heads=0,
                             patch_size=0))
  kw = builders.tower_kwargs(c.image, jnp.float32)
  assert kw == dict(width=384, depth=3, mlp_dim=1536, num_heads=6, patch_size=32,
                    pool="cls", dtype=jnp.float32, dropout=0.0, patch_dropout=0.0,
                    opts=layers.TransformerOptions())
  c.image.update(variant="", depth=0)
  with pytest.raises(ValueError, match="depth"):
    builders.tower_kwargs(c.image, jnp.float32)


# ------------------------------------------------------------------------------ text


def test_text_causal_masking(tt):
  _, model, _, variables = tt
  bidir = models.build_model(tiny_config(txt=dict(causal=False)))  # Same params.
  # Repeating one token: only the positions tell the (bidirectional) features apart.
  _, same = bidir.apply(variables, np.full((B, L), 5, np.int32), method="embed_text")
  assert max_abs_diff(same[:, 0], same[:, 1]) > 1e-3
  rng = np.random.default_rng(2)
  tokens = random_tokens(rng, (B, L))
  for j in (1, 4, L - 1):
    changed = tokens.copy()
    changed[:, j] = changed[:, j] % (V - 1) + 1  # Another non-PAD id.
    assert np.all(changed[:, j] != tokens[:, j])
    _, a = model.apply(variables, tokens, method="embed_text")
    _, b = model.apply(variables, changed, method="embed_text")
    np.testing.assert_allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert max_abs_diff(a[:, j:], b[:, j:]) > 1e-3
    _, a = bidir.apply(variables, tokens, method="embed_text")
    _, b = bidir.apply(variables, changed, method="embed_text")
    assert max_abs_diff(a[:, :j], b[:, :j]) > 1e-3


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "eos"), (False, "mean"),
                                         (False, "first")])
def test_text_padding_is_ignored(causal, pool, tt):
  """Embeddings and features of the real tokens do not depend on the padding."""
  _, _, _, variables = tt
  model = models.build_model(tiny_config(txt=dict(causal=causal, pool=pool)))
  tokens = np.array([[1, 5, 7, 9, 2, 0, 0, 0],
                     [1, 3, 2, 0, 0, 0, 0, 0]], np.int32)
  emb, feats = model.apply(variables, tokens, method="embed_text")
  # Cut to 5: row 0 loses all its padding, row 1 keeps 2 of its 5 PADs.
  emb_cut, feats_cut = model.apply(variables, tokens[:, :5], method="embed_text")
  np.testing.assert_allclose(emb, emb_cut, atol=1e-5)
  np.testing.assert_allclose(feats[0, :5], feats_cut[0], atol=1e-5)
  np.testing.assert_allclose(feats[1, :3], feats_cut[1, :3], atol=1e-5)
  # Filling the padding with real tokens does change the embedding.
  filled = np.where(tokens == text.PAD_ID, 5, tokens)
  emb_filled, _ = model.apply(variables, filled, method="embed_text")
  if not (causal and pool == "first"):
    assert max_abs_diff(emb, emb_filled) > 1e-3


def test_text_longer_than_context_raises(tt):
  _, model, _, variables = tt
  with pytest.raises(ValueError, match="exceeds context_length"):
    model.apply(variables, jnp.ones((1, L + 1), jnp.int32), method="embed_text")


def test_pool_tokens_against_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 7, 6)).astype(np.float32)
  lengths = [7, 1, 4, 2, 0]
  tokens = np.zeros((5, 7), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(1, V, size=n)
  eos = np.asarray(text.pool_tokens(jnp.asarray(x), jnp.asarray(tokens), "eos"))
  first = np.asarray(text.pool_tokens(jnp.asarray(x), jnp.asarray(tokens), "first"))
  mean = np.asarray(text.pool_tokens(jnp.asarray(x), jnp.asarray(tokens), "mean"))
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(first[i], x[i, 0])
    if n == 0:
      np.testing.assert_allclose(mean[i], 0.0)
      continue
    last = np.nonzero(tokens[i])[0].max()
    np.testing.assert_allclose(eos[i], x[i, last])
    np.testing.assert_allclose(mean[i], x[i, :n].astype(np.float64).mean(0), atol=1e-6)
  with pytest.raises(ValueError, match="Unknown text pool"):
    text.pool_tokens(jnp.asarray(x), jnp.asarray(tokens), "max")


# ------------------------------------------------------------------------------ CoCa


def test_coca_caption_causality(coca, batch):
  _, model, _, variables = coca
  rng = np.random.default_rng(4)
  tokens = random_tokens(rng, (B, L))
  base = model.apply(variables, {"image": batch["image"], "text": tokens})
  logits = np.asarray(base["caption_logits"])
  for t in (0, 3, L - 2):
    changed = tokens.copy()
    changed[:, t + 1:] = changed[:, t + 1:] % (V - 1) + 1
    out = model.apply(variables, {"image": batch["image"], "text": changed})
    np.testing.assert_allclose(out["caption_logits"][:, :t + 1], logits[:, :t + 1],
                               atol=1e-5)
    assert max_abs_diff(out["caption_logits"][:, t + 1:], logits[:, t + 1:]) > 1e-3
  # The logits depend on the image: same text, images swapped.
  other = model.apply(variables, {"image": batch["image"][::-1], "text": tokens})
  for i in range(B):
    assert max_abs_diff(other["caption_logits"][i], logits[i]) > 1e-3
  # `decode` (used by generation) computes the same logits as the full forward pass.
  _, _, context = model.apply(variables, batch["image"], method="encode_image")
  assert context.shape == (B, Q, W_TXT)
  decoded = model.apply(variables, tokens, context, method="decode")
  np.testing.assert_allclose(decoded, logits, atol=1e-5)


# ----------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("which", ["two_tower", "coca"])
def test_bfloat16_compute(which, tt, coca, tt_out, coca_out, batch):
  _, _, _, variables = tt if which == "two_tower" else coca
  ref = tt_out if which == "two_tower" else coca_out
  model = models.build_model(tiny_config(which, dtype="bfloat16"))
  # Params are created in float32 whatever the compute dtype.
  abstract = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(abstract))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = jax.jit(model.apply)(variables, batch)
  assert set(out) == set(ref)
  assert out["image_tokens"].dtype == jnp.bfloat16
  assert out["text_tokens"].dtype == jnp.bfloat16
  # Embeddings are L2-normalised in float32.
  assert out["image_emb"].dtype == jnp.float32
  assert out["text_emb"].dtype == jnp.float32
  assert out["logit_scale"].dtype == jnp.float32
  for key in ("image_emb", "text_emb"):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[key], ref[key], atol=0.05)
  if which == "coca":
    assert out["caption_logits"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["caption_logits"], np.float32),
                               ref["caption_logits"], atol=0.1)
    assert max_abs_diff(out["caption_logits"], ref["caption_logits"]) > 0


def test_unknown_dtype_raises():
  with pytest.raises(ValueError, match="float64"):
    models.build_model(tiny_config(dtype="float64"))


# ------------------------------------------------------------- attention vs. NumPy


def numpy_attention(params, x, context, mask, causal, num_heads):
  """Float64 multi-head attention from the q/k/v/out kernels and biases (if any)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  context = x if context is None else np.asarray(context, np.float64)
  proj = lambda t, name: t @ p[name]["kernel"] + p[name].get("bias", 0.0)
  b, lq, width = x.shape
  lk = context.shape[1]
  hd = width // num_heads
  heads = lambda t: t.reshape(b, -1, num_heads, hd).transpose(0, 2, 1, 3)
  q, k, v = heads(proj(x, "query")), heads(proj(context, "key")), heads(
      proj(context, "value"))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # [B, H, Lq, Lk]
  allowed = np.ones((b, num_heads, lq, lk), bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask), allowed.shape)
  if causal:
    allowed &= np.tril(np.ones((lq, lk), bool))
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, lq, width)
  return proj(out, "out")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (False, True)])
def test_attention_matches_numpy(masked, causal, cross):
  rng = np.random.default_rng(5)
  heads, width, lq = 4, 32, 6
  lk = 5 if cross else lq
  x = jnp.asarray(rng.normal(size=(3, lq, width)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(3, lk, width)), jnp.float32) if cross else None
  mask = None
  if masked:
    valid = np.array([lk, 2, 1])  # Right padding; every row keeps its first key.
    mask = jnp.asarray((np.arange(lk)[None] < valid[:, None])[:, None, None, :])
  module = layers.Attention(num_heads=heads, causal=causal)
  params = nn.unbox(module.init(jax.random.key(0), x, context=context)["params"])
  assert set(params) == {"query", "key", "value", "out"}
  for name in ("query", "value", "out"):
    assert set(params[name]) == {"kernel", "bias"}, name
  # Random values everywhere, so that biases matter too.
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32) for a in leaves])
  got = module.apply({"params": params}, x, context=context, mask=mask)
  want = numpy_attention(params, x, context, mask, causal, heads)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("which", ["two_tower", "coca"])
def test_dropout(which, tt, coca, tt_out, coca_out, batch):
  _, _, _, variables = tt if which == "two_tower" else coca
  ref = tt_out if which == "two_tower" else coca_out
  model = models.build_model(tiny_config(which, image=dict(dropout=0.3),
                                         txt=dict(dropout=0.3)))
  apply = lambda seed: model.apply(variables, batch, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  a, b, a_again = apply(0), apply(1), apply(0)
  for key in ("image_emb", "text_emb") + (("caption_logits",) if which == "coca" else ()):
    assert max_abs_diff(a[key], b[key]) > 1e-3, key
    np.testing.assert_array_equal(a[key], a_again[key])
    assert max_abs_diff(a[key], ref[key]) > 1e-3, key
  # Evaluation is deterministic and equal to the model without dropout.
  e1 = model.apply(variables, batch, train=False)
  e2 = model.apply(variables, batch, train=False)
  for key in ref:
    np.testing.assert_array_equal(e1[key], e2[key])
    np.testing.assert_allclose(e1[key], ref[key], atol=1e-6)
