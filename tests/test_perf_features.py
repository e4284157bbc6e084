"""Speed switches compute the same function: scan, remat, fused QKV, patch dropout, dtype."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_train
from vlp_jax import validation
from vlp_jax.perf import benchmark
from vlp_jax.models import build_model, convert, layers, vit
from vlp_jax.train import step as step_lib


def tiny(coca=False, **model):
  """Two-layer towers; CoCa (decoder with cross-attention) or a CLIP two-tower."""
  c = test_train.tiny_config()
  c.model.image.depth = 2
  c.model.text.depth = 2
  if not coca:
    c.model.name = "two_tower"
    c.objectives = {"clip": 1.0}
  c.model.update(model)
  return c


@functools.cache
def batch():
  return benchmark.synthetic_batch(tiny())


def init_params(config):
  model = build_model(config.model)
  v = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                 batch(), train=False)
  return nn.meta.unbox(v["params"])


def loss_and_grads(config, params):
  model = build_model(config.model)
  objs = step_lib.objectives_from_config(config)
  fn = jax.jit(jax.value_and_grad(
      lambda p: step_lib.compute_loss(p, model, objs, batch(), jax.random.PRNGKey(3))[0]))
  return fn(params)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
  """Per leaf: |a - b| <= rtol |b| + atol max|b| (float32 reassociation noise)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=rtol, atol=atol * float(np.max(np.abs(y))) + 1e-8), a, b)


@functools.cache
def reference(coca=False):
  params = init_params(tiny(coca))
  return params, loss_and_grads(tiny(coca), params)


@pytest.mark.slow  # scan_layers is also checked by test_remat_policies_give_identical_results.
def test_scan_matches_unrolled_after_stacking():
  params, (loss, grads) = reference(coca=True)
  config = tiny(coca=True, scan_layers=True)
  stacked = convert.stack_blocks(params)
  # The stacked tree is exactly the scanned model's param structure.
  assert jax.tree.structure(stacked) == jax.tree.structure(init_params(config))
  assert stacked["img"]["encoder"]["layers"]["block"]["mlp"]["fc1"]["kernel"].shape[0] == 2
  s_loss, s_grads = loss_and_grads(config, stacked)
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  assert_tree_close(convert.unstack_blocks(s_grads), grads)


@pytest.mark.parametrize("policy,scan", [("full", False), ("dots_saveable", True),
                                         ("save_qkv_proj", True)])
def test_remat_policies_give_identical_results(policy, scan):
  params, (loss, grads) = reference()
  config = tiny(remat=policy, scan_layers=scan)
  p = convert.stack_blocks(params) if scan else params
  r_loss, r_grads = loss_and_grads(config, p)
  np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
  assert_tree_close(convert.unstack_blocks(r_grads) if scan else r_grads, grads)


def test_fused_qkv_matches_separate_projections():
  params, (loss, grads) = reference()
  config = tiny(fused_qkv=True)
  fused = convert.fuse_qkv(params)
  assert jax.tree.structure(fused) == jax.tree.structure(init_params(config))
  attn = fused["img"]["encoder"]["block_0"]["attn"]
  assert attn["qkv_kernel"].shape == (32, 3, 32) and attn["qv_bias"].shape == (2, 32)
  assert "key" not in attn  # still no key bias
  f_loss, f_grads = loss_and_grads(config, fused)
  np.testing.assert_allclose(f_loss, loss, rtol=1e-5)
  assert_tree_close(f_grads, convert.fuse_qkv(grads))


def test_fused_qkv_kernel_shards_heads_over_tensor():
  config = tiny(fused_qkv=True, scan_layers=True)
  setup = benchmark.TrainSetup(config)
  spec = setup.state_shardings.params["txt"]["encoder"]["layers"]["block"]["attn"][
      "qkv_kernel"].spec
  # (layers, embed, 3, heads) -> (unsharded, fsdp, unsharded, tensor)
  assert tuple(spec) == (None, "fsdp", None, "tensor")


def test_patch_dropout_keeps_a_random_subset_in_training_only():
  kw = dict(width=32, depth=0, mlp_dim=64, num_heads=2, patch_size=8, pool="gap")
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)),
                       jnp.float32)
  full = vit.ViT(**kw)
  dropped = vit.ViT(**kw, patch_dropout=0.5)
  params = full.init(jax.random.PRNGKey(0), images)
  _, ref = full.apply(params, images)
  _, ev = dropped.apply(params, images, train=False)
  np.testing.assert_array_equal(ev, ref)  # identity at evaluation
  _, tr = dropped.apply(params, images, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
  n = 16
  assert tr.shape == (4, round(n * 0.5), 32)
  kept = []
  for b in range(4):
    # depth 0: tokens are per-patch functions, so each kept token (positions added
    # before dropping) is one of the full model's tokens, in order.
    d = np.abs(np.asarray(tr[b])[:, None] - np.asarray(ref[b])[None]).max(-1)
    idx = d.argmin(1)
    assert np.all(d.min(1) < 1e-5) and np.all(np.diff(idx) > 0)
    kept.append(tuple(idx))
  assert len(set(kept)) > 1  # a different subset per example
  assert vit.num_kept_patches(196, 0.5) == 98 and vit.num_kept_patches(196, 0.75) == 49
  assert vit.num_kept_patches(4, 0.99) == 1


def test_patch_dropout_with_cls_token_in_a_train_step():
  config = tiny()
  config.model.name = "two_tower"
  config.objectives = {"clip": 1.0}
  config.model.image.patch_dropout = 0.75
  model = build_model(config.model)
  params = init_params(config)
  out = model.apply({"params": params}, batch(), train=True,
                    rngs={"dropout": jax.random.PRNGKey(0)})
  assert out["image_tokens"].shape[1] == 4  # 16 patches, cls returned separately
  out = model.apply({"params": params}, batch(), train=False)
  assert out["image_tokens"].shape[1] == 16


def test_bfloat16_computes_with_float32_params_and_optimizer_state():
  config = tiny(dtype="bfloat16")
  setup = benchmark.TrainSetup(config)
  with setup.contexts()[0], setup.contexts()[1]:
    state = setup.create_state()
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves), {
        x.dtype for x in leaves}
    state, m = setup.step_fn(state, benchmark.synthetic_batch(config))
  assert m["loss"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  model = build_model(config.model)
  # Jitted: one compile (eagerly, each of the model's ops compiles on its own).
  out = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False))(
      state.params, batch())
  # Embeddings (hence contrastive logits) are float32; matmuls ran in bfloat16.
  assert out["image_emb"].dtype == jnp.float32 and out["text_emb"].dtype == jnp.float32
  assert out["image_tokens"].dtype == jnp.bfloat16
  # The bf16 loss tracks the float32 one.
  f32_params, (f32_loss, _) = reference()  # Shared with the remat tests.
  bf16_loss, _ = loss_and_grads(config, f32_params)
  np.testing.assert_allclose(bf16_loss, f32_loss, rtol=2e-2)


def test_attention_implementation_is_chosen_by_platform(monkeypatch):
  pick = layers.attention_implementation
  assert pick("auto", jnp.bfloat16, 64, False) == "einsum"  # CPU here
  assert pick("auto", jnp.float32, 64, True) == "einsum"
  assert pick("xla", jnp.bfloat16, 64, False) == "xla"
  assert pick("cudnn", jnp.float32, 64, True) == "cudnn"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert pick("auto", jnp.bfloat16, 64, False) == "cudnn"
  assert pick("auto", jnp.float16, 128, False) == "cudnn"
  assert pick("auto", jnp.float32, 64, False) == "xla"
  assert pick("auto", jnp.bfloat16, 64, True) == "xla"  # explicit masks stay on XLA
  assert pick("auto", jnp.bfloat16, 36, False) == "xla"  # head dim not a multiple of 8
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert pick("auto", jnp.bfloat16, 64, False) == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    pick("flash", jnp.bfloat16, 64, False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "causal+padding"])
def test_einsum_attention_equals_jax_xla_attention(kind, dtype):
  """Values and gradients of layers.einsum_attention against jax's own XLA attention,
  at an odd length, with the masks the towers use."""
  b, length, heads, dim = 3, 13, 4, 8
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v, g = (jax.random.normal(kk, (b, length, heads, dim)).astype(dtype)
                for kk in keys)
  causal = "causal" in kind
  mask = None
  if "padding" in kind:  # text.padding_mask's [B, 1, 1, L] form; one row all padding
    lengths = jnp.array([length, 5, 0])
    mask = (jnp.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
  ref = lambda *t: jax.nn.dot_product_attention(*t, mask=mask, is_causal=causal,
                                                implementation="xla")
  ours = lambda *t: layers.einsum_attention(*t, mask, causal)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  out_ref, vjp_ref = jax.vjp(ref, q, k, v)
  out, vjp = jax.vjp(ours, q, k, v)
  assert out.dtype == out_ref.dtype == dtype
  np.testing.assert_allclose(np.float32(out), np.float32(out_ref), **tol)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)


def test_bad_switch_values_are_clear_errors():
  from vlp_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  for key, value, match in (("remat", "some", "model.remat"),
                            ("attention_impl", "flash", "attention_impl")):
    c = tiny(**{key: value})
    with pytest.raises(ValueError, match=match):
      validation.validate(c)
  c = tiny()
  c.model.image.patch_dropout = 1.0
  with pytest.raises(ValueError, match="patch_dropout"):
    validation.validate(c)
  c = tiny()
  c.profile_steps = [5, 2]
  with pytest.raises(ValueError, match="profile_steps"):
    validation.validate(c)


def test_checkpoint_mismatch_names_the_scan_and_fused_switches():
  from vlp_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  keys = lambda tree: set(checkpoint._param_shapes(tree))  # pylint: disable=protected-access
  params, _ = reference()
  plain, scanned, fused = keys(params), keys(convert.stack_blocks(params)), keys(
      convert.fuse_qkv(params))
  hint = checkpoint.layout_hint(sorted(scanned - plain), sorted(plain - scanned))
  assert "scan_layers" in hint and "fused_qkv" not in hint
  hint = checkpoint.layout_hint(sorted(plain - scanned), sorted(scanned - plain))
  assert "scan_layers" in hint
  hint = checkpoint.layout_hint(sorted(fused - plain), sorted(plain - fused))
  assert "fused_qkv" in hint and "scan_layers" not in hint
  assert checkpoint.layout_hint(["['x']"], []) == ""


@pytest.mark.parametrize("length,causal", [
    pytest.param(197, False, marks=pytest.mark.slow), (77, True), (10, False)])
def test_even_length_attention_matches_plain_attention(length, causal):
  """The padding used for cuDNN (odd lengths) changes neither outputs nor gradients."""
  q, k, v = (jax.random.normal(key, (2, length, 3, 8))
             for key in jax.random.split(jax.random.key(0), 3))
  padded = lambda q, k, v: layers.even_length_attention(q, k, v, causal, "xla")
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  for a, b in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v),
                  jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-4)
