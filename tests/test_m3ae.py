"""M3AE (vlp_jax/models/m3ae.py, vlp_jax/objectives/m3ae.py): the losses against
NumPy loops written from the equations, the shared masking, padding handling, the
outputs, config checks, FLOP counts and a 2-step run of the recipe."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import m3ae_b16
from tests import test_flops
from vlp_jax import cli, config as config_lib, errors, models, validation
from vlp_jax.models import m3ae as m3ae_model
from vlp_jax.objectives import m3ae as m3ae_loss
from vlp_jax.perf import flops
from vlp_jax.train import loop
from vlp_jax.train import metric_writer as metrics_lib

B, N, P, L, V = 3, 5, 6, 7, 9


def _f32(x):
  return np.asarray(x, np.float32).astype(np.float64)


# ------------------------------------------------------------------ the losses


def ref_image_loss(pred, target, mask, norm_pix=False):
  """Loop form: per example, mean over masked patches of the per-patch MSE; batch mean."""
  total = 0.0
  for b in range(pred.shape[0]):
    s, count = 0.0, 0
    for j in range(pred.shape[1]):
      if mask[b, j]:
        t = target[b, j]
        if norm_pix:
          t = (t - t.mean()) / np.sqrt(t.var() + 1e-6)
        s += sum((pred[b, j, k] - t[k]) ** 2 for k in range(len(t))) / len(t)
        count += 1
    total += s / max(count, 1)
  return total / pred.shape[0]


def ref_image_grad(pred, target, mask):
  """d loss / d pred: 2 (pred - target) / (P * masked_b * B) at masked patches."""
  g = np.zeros_like(pred)
  for b in range(pred.shape[0]):
    count = mask[b].sum()
    for j in range(pred.shape[1]):
      if mask[b, j]:
        g[b, j] = 2 * (pred[b, j] - target[b, j]) / (pred.shape[2] * count * pred.shape[0])
  return g


def ref_text_loss_and_grad(logits, tokens, mask):
  """Loop form: per example, mean CE over target positions (0 if none); batch mean;
  d/dlogits = (softmax - onehot) / (count_b * B) at target positions."""
  loss, grad = 0.0, np.zeros_like(logits)
  for b in range(logits.shape[0]):
    count = mask[b].sum()
    s = 0.0
    for t in range(logits.shape[1]):
      if not mask[b, t]:
        continue
      z = logits[b, t] - logits[b, t].max()
      p = np.exp(z) / np.exp(z).sum()
      s += -np.log(p[tokens[b, t]])
      onehot = np.eye(logits.shape[2])[tokens[b, t]]
      grad[b, t] = (p - onehot) / (count * logits.shape[0])
    loss += s / count if count else 0.0
  return loss / logits.shape[0], grad


@pytest.fixture(scope="module")
def loss_inputs():
  rng = np.random.default_rng(0)
  pred, target = _f32(rng.normal(size=(B, N, P))), _f32(rng.normal(size=(B, N, P)))
  img_mask = np.array([[1, 0, 1, 1, 0]] * B, np.float64)
  logits = _f32(rng.normal(size=(B, L, V)) * 2)
  tokens = rng.integers(1, V, size=(B, L))
  # Example 2 has no target at all (all padding masked out): it adds 0.
  txt_mask = np.array([[1, 0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0], [0] * L], np.float64)
  return pred, target, img_mask, logits, tokens, txt_mask


def test_image_loss_and_gradient_match_the_loop(loss_inputs):
  pred, target, mask, *_ = loss_inputs
  loss, grad = jax.value_and_grad(m3ae_loss.image_loss)(
      jnp.asarray(pred, jnp.float32), target, mask)
  np.testing.assert_allclose(loss, ref_image_loss(pred, target, mask), rtol=1e-5)
  np.testing.assert_allclose(grad, ref_image_grad(pred, target, mask), rtol=1e-4,
                             atol=1e-7)
  # Unmasked patches carry no loss: changing their prediction changes nothing.
  moved = pred.copy()
  moved[:, 1] += 5.0
  assert float(m3ae_loss.image_loss(moved, target, mask)) == pytest.approx(float(loss))


def test_norm_pix_loss_option(loss_inputs):
  pred, target, mask, *_ = loss_inputs
  got = m3ae_loss.image_loss(pred, target, mask, norm_pix_loss=True)
  np.testing.assert_allclose(got, ref_image_loss(pred, target, mask, True), rtol=1e-5)
  assert abs(float(got) - ref_image_loss(pred, target, mask)) > 1e-3
  # Through the registered objective and its options.
  out = {"m3ae_pixel_pred": pred, "m3ae_pixel_target": target, "m3ae_image_mask": mask}
  loss, _ = m3ae_loss.m3ae_image(out, {}, {"norm_pix_loss": True})
  np.testing.assert_allclose(loss, got, rtol=1e-6)
  with pytest.raises(ValueError, match="Did you mean 'norm_pix_loss'"):
    m3ae_loss.m3ae_image(out, {}, {"norm_pix": True})


def test_text_loss_and_gradient_match_the_loop(loss_inputs):
  *_, logits, tokens, mask = loss_inputs
  fn = lambda z: m3ae_loss.text_loss(z, tokens, mask)
  (loss, acc), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits, jnp.float32))
  want_loss, want_grad = ref_text_loss_and_grad(logits, tokens, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  correct = (logits.argmax(-1) == tokens) * mask
  want_acc = np.mean([correct[b].sum() / max(mask[b].sum(), 1e-5) for b in range(B)])
  np.testing.assert_allclose(acc, want_acc, rtol=1e-6)


# ------------------------------------------------------------------ the model


def tiny_config(contrastive=False):
  """A 32 px, 4 x 4-patch M3AE over a 12-token text (keeps 4 of 16 patches, 3 of 12
  positions)."""
  c = config_lib.default_config()
  c.model.name = "m3ae"
  c.model.embed_dim = 16
  c.model.image.update(variant="", width=32, depth=1, mlp_dim=64, num_heads=2,
                       patch_size=8)
  c.model.text.update(vocab_size=20, context_length=12)
  c.model.m3ae.update(decoder_width=16, decoder_depth=1, decoder_heads=2,
                      decoder_mlp_dim=32, contrastive=contrastive)
  c.data.update(image_size=32, tokenizer="words:shapes")
  c.objectives = {"m3ae_image": 1.0, "m3ae_text": 0.5}
  if contrastive:
    c.objectives["clip"] = 1.0
  c.evals = {}
  return c


def tiny_batch(b=4):
  rng = np.random.default_rng(1)
  text = np.zeros((b, 12), np.int32)
  for i, n in enumerate([12, 5, 3, 8][:b]):  # Row 0 has no padding.
    text[i, :n] = rng.integers(1, 20, size=n)
  return {"image": rng.normal(size=(b, 32, 32, 3)).astype(np.float32), "text": text}


@pytest.fixture(scope="module")
def tiny():
  """(model, params, apply fn jitted over (params, batch, rng))."""
  c = tiny_config()
  model = models.build_model(c.model)
  init = jax.jit(lambda rngs: model.init(rngs, tiny_batch())["params"])
  params = nn.meta.unbox(init({"params": jax.random.PRNGKey(0),
                               "dropout": jax.random.PRNGKey(1)}))
  fn = jax.jit(lambda p, batch, rng: model.apply({"params": p}, batch, train=True,
                                                  rngs={"dropout": rng}))
  return model, params, fn


def test_outputs_and_shapes(tiny):
  model, params, fn = tiny
  out = fn(params, tiny_batch(), jax.random.PRNGKey(2))
  assert set(out) == set(models.output_names(model.config))
  assert out["m3ae_pixel_pred"].shape == out["m3ae_pixel_target"].shape == (4, 16, 192)
  assert out["m3ae_image_mask"].shape == (4, 16)
  assert out["m3ae_text_logits"].shape == (4, 12, 20)
  assert out["m3ae_text_mask"].shape == (4, 12)
  # The target is the batch image itself, patchified row-major.
  img = tiny_batch()["image"]
  np.testing.assert_array_equal(out["m3ae_pixel_target"][0, 1],
                                img[0, :8, 8:16].reshape(-1))
  emb, tokens = model.apply({"params": params}, tiny_batch()["image"],
                            method="embed_image")
  assert emb.shape == (4, 32) and tokens.shape == (4, 16, 32)
  with pytest.raises(errors.ConfigError, match="m3ae.contrastive=True.*linear_probe"):
    model.apply({"params": params}, tiny_batch()["text"], method="embed_text")


def test_one_permutation_for_the_batch_and_keep_counts(tiny):
  _, params, fn = tiny
  batch = tiny_batch()
  out = fn(params, batch, jax.random.PRNGKey(3))
  img_mask = np.asarray(out["m3ae_image_mask"])
  assert (img_mask == img_mask[:1]).all()  # The same patches for every example.
  assert img_mask[0].sum() == 16 - m3ae_model.keep_count(16, 0.75) == 12
  txt = np.asarray(out["m3ae_text_mask"])
  # Row 0 has no padding: its targets are all 12 - int(12 * 0.25) = 9 masked positions;
  # the others are the same positions less their padding.
  assert txt[0].sum() == 9
  valid = batch["text"] != 0
  np.testing.assert_array_equal(txt, txt[:1] * valid)
  # Deterministic in the key; another key draws another mask.
  again = fn(params, batch, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(again["m3ae_image_mask"], img_mask)
  other = fn(params, batch, jax.random.PRNGKey(4))
  assert not np.array_equal(other["m3ae_image_mask"], img_mask)
  ids, restore, mask = m3ae_model.shared_masking(jax.random.PRNGKey(5), 10, 3)
  assert ids.shape == (3,) and mask.sum() == 7 and (mask[np.asarray(ids)] == 0).all()
  np.testing.assert_array_equal(np.sort(np.asarray(restore)), np.arange(10))


def _kept_text_positions(key):
  """The text positions the model keeps for dropout key `key`."""
  _, txt_key = jax.random.split(key)
  return np.asarray(m3ae_model.shared_masking(txt_key, 12, 3)[0])


def test_padding_is_never_seen(tiny):
  """Changing the embedding of the padding id (as if the padding tokens were other
  tokens) changes no output at a real position, though kept padding tokens are in
  the encoder's sequence; changing a real token's embedding does."""
  _, params, fn = tiny
  batch = tiny_batch()
  key = jax.random.PRNGKey(3)
  kept = _kept_text_positions(key)
  assert (batch["text"][:, kept] == 0).any()  # Some kept tokens are padding.
  out = fn(params, batch, key)
  valid = batch["text"] != 0

  def moved(token_id):
    p = jax.tree.map(lambda x: x, params)
    table = p["token_embed"]["embedding"]
    # A random direction: a constant shift of every dimension would vanish in the
    # LayerNorms.
    shift = jax.random.normal(jax.random.PRNGKey(token_id), table.shape[1:])
    p["token_embed"]["embedding"] = table.at[token_id].add(shift)
    return fn(p, batch, key)

  pad = moved(0)
  np.testing.assert_allclose(pad["m3ae_pixel_pred"], out["m3ae_pixel_pred"], atol=1e-5)
  np.testing.assert_allclose(np.asarray(pad["m3ae_text_logits"])[valid],
                             np.asarray(out["m3ae_text_logits"])[valid], atol=1e-5)
  real = int(batch["text"][0, kept[0]])
  assert real != 0
  changed = moved(real)
  assert np.abs(changed["m3ae_pixel_pred"] - out["m3ae_pixel_pred"]).max() > 1e-3


@pytest.mark.slow  # ~10 s of CPU compiling the head's extra encoder passes.
def test_contrastive_head():
  c = tiny_config(contrastive=True)
  validation.validate(c)
  model = models.build_model(c.model)
  batch = tiny_batch(2)

  @jax.jit
  def run(batch):
    variables = model.init({"params": jax.random.PRNGKey(0),
                            "dropout": jax.random.PRNGKey(1)}, batch)
    out = model.apply(variables, batch, train=True,
                      rngs={"dropout": jax.random.PRNGKey(2)})
    return (out, model.apply(variables, batch["image"], method="embed_image")[0],
            model.apply(variables, batch["text"], method="embed_text")[0])

  out, image_emb, text_emb = run(batch)
  assert {"image_emb", "text_emb", "logit_scale"} <= set(out)
  np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
  # Evaluation embeds the whole image alone, as the contrastive head in training.
  np.testing.assert_allclose(image_emb, out["image_emb"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(text_emb, out["text_emb"], rtol=1e-5, atol=1e-6)


def test_config_errors():
  c = tiny_config()
  validation.validate(c)
  c.objectives["clip"] = 1.0  # No contrastive head: no image_emb.
  with pytest.raises(errors.ConfigError, match=r"config.model.m3ae.contrastive=True"):
    validation.validate(c)
  for key, value, match in (("image_mask_ratio", 1.0, r"image_mask_ratio=1.0.*\[0, 1\)"),
                            ("pool", "max", r"m3ae.pool='max'"),
                            ("decoder_widht", 8, "Did you mean 'decoder_width'")):
    c = tiny_config()
    c.model.m3ae[key] = value
    with pytest.raises((errors.ConfigError, errors.ConfigKeyError), match=match):
      validation.validate(c)


# ------------------------------------------------------------------ FLOPs and the recipe


def test_recipe_flops_by_hand():
  c = m3ae_b16.get_config()
  macs = flops.forward_macs(c)
  blk = lambda s, w, m: 4 * s * w * w + 2 * s * s * w + 2 * s * w * m
  # 256 patches (256 px / 16), 64 kept; 64 text positions, 16 kept; + [CLS].
  enc = 64 * 768 * 768 + 12 * blk(81, 768, 3072)
  dec = 81 * 768 * 512 + 8 * blk(1 + 256 + 64, 512, 2048)
  heads = 256 * 512 * 768 + 64 * 512 * 49408
  assert macs == {"encoder": enc, "decoder": dec, "heads": heads, "image": 0,
                  "text": 0, "logits": 0}
  assert flops.tower_train_flops_per_sample(c, "image") == 6 * (
      256 * 768 * 768 + 12 * blk(257, 768, 3072))
  on = m3ae_b16.get_config("contrastive")
  both = flops.forward_macs(on)
  assert both["image"] == 256 * 768 * 768 + 12 * blk(257, 768, 3072)
  assert both["text"] == 12 * blk(65, 768, 3072)
  assert both["logits"] == 4096 * 512 and both["heads"] == heads + 2 * 768 * 512


@pytest.mark.slow  # ~15 s of CPU each: compiles the train step (the hand count is fast).
@pytest.mark.parametrize("contrastive", [False, True])
def test_analytic_count_matches_xla_cost_analysis(contrastive):
  c = tiny_config(contrastive)
  c.batch_size = 8
  # Wide enough that matmuls dominate the elementwise ops XLA also counts.
  c.model.image.update(width=128, mlp_dim=512, depth=2)
  c.model.m3ae.update(decoder_width=128, decoder_mlp_dim=512)
  c.model.embed_dim = 128
  test_flops.assert_analytic_matches_xla(c)


def test_recipe_runs_two_steps_on_shapes(tmp_path):
  c = cli.load_config_file("configs/m3ae_b16.py:runlocal")
  full = cli.load_config_file("configs/m3ae_b16.py")
  assert dict(full.objectives) == {"m3ae_image": 1.0, "m3ae_text": 0.5}
  assert full.optim.lr == pytest.approx(1.5e-4 * 4096 / 256) and full.optim.b2 == 0.95
  assert list(full.evals) == ["linear_probe"]
  c.update(batch_size=8, total_steps=2, checkpoint_every=0, log_every=1, plot=False)
  c.evals = {}
  loop.run(c, str(tmp_path))
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
          if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["m3ae_text/loss"] > 0
    assert r["loss"] == pytest.approx(r["m3ae_image/loss"] + 0.5 * r["m3ae_text/loss"],
                                      rel=1e-5)
