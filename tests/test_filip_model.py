"""FILIP in the two-tower family: per-token embeddings, their predict fns, the blocked
token-wise evaluators (zero-shot, retrieval) against dense NumPy, and the FLOPs.

One tiny two-tower model (tests/test_train.tiny_config: 32 px, patch 8, width 32,
depth 1, context 24, token_embed_dim 8) and one set of jitted predict fns are shared
by the whole module.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_flops, test_train
from vlp_jax import errors, models, validation
from vlp_jax.data import pipeline
from vlp_jax.data import templates as templates_lib
from vlp_jax.evaluators import common, metrics
from vlp_jax.models import interface, text
from vlp_jax.objectives import filip
from vlp_jax.perf import flops
from vlp_jax.train import evaluation, predict

D_TOK = 8
N_PATCH = (32 // 8) ** 2  # patch tokens; the ViT's class token is not one of them


def filip_config(**model):
  c = test_train.tiny_config(evals=True)
  c.model.name = "two_tower"
  c.model.token_embed_dim = D_TOK
  c.model.update(model)
  c.objectives = {"clip": 1.0}
  del c.evals["captioning"]
  # Batches of 4, as the module's other calls: the predict fns compile once.
  c.evals.zeroshot.update(size=10, batch_size=4)
  c.evals.retrieval.update(size=10, batch_size=4)
  return c


@pytest.fixture(scope="module")
def setup():
  c = filip_config()
  model = models.build_model(c.model)
  tokenizer = pipeline.make_tokenizer(c.data)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  tokens = tokenizer.tokenize(["a red circle", "a big blue square on the left",
                               "green", "a small yellow triangle at the top"], 24)
  batch = {"image": jnp.asarray(images), "text": jnp.asarray(tokens)}
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  params = variables["params"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  fns = predict.make_predict_fns(model, tokenizer, c.model.text.context_length)
  out = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  return types.SimpleNamespace(config=c, model=model, params=params, batch=batch,
                               out=out, fns=fns, mesh=mesh, tokenizer=tokenizer,
                               variables=variables)


def dense_scores(img, txt, mask):
  """FILIP's s^I and s^T by the paper's formulas, in float64 loops over pairs."""
  img, txt, mask = (np.asarray(a, np.float64) for a in (img, txt, mask))
  i2t = np.zeros((len(img), len(txt)))
  t2i = np.zeros((len(img), len(txt)))
  for i in range(len(img)):
    for j in range(len(txt)):
      real = mask[j] > 0
      sim = img[i] @ txt[j][real].T  # [N, real tokens]
      i2t[i, j] = sim.max(axis=1).mean()
      t2i[i, j] = sim.max(axis=0).mean()
  return i2t, t2i


def in_blocks_of_4(fn, params, x):
  """fn over zero-padded blocks of 4 rows (the evaluators' compiled shape), unpadded."""
  pad = -len(x) % 4
  x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  outs = [fn(params, x[s:s + 4]) for s in range(0, len(x), 4)]
  cat = lambda parts: np.concatenate([np.asarray(p) for p in parts])[:len(x) - pad]
  return tuple(map(cat, zip(*outs))) if isinstance(outs[0], tuple) else cat(outs)


# --------------------------------------------------------------------- model outputs


def test_outputs_shapes_mask_and_normalisation(setup):
  c, out, tokens = setup.config, setup.out, np.asarray(setup.batch["text"])
  assert set(out) == set(models.output_names(c.model))
  assert {"image_token_emb", "text_token_emb", "text_token_mask"} <= set(out)
  assert out["image_token_emb"].shape == (4, N_PATCH, D_TOK)
  assert out["text_token_emb"].shape == (4, 24, D_TOK)
  assert out["text_token_mask"].dtype == jnp.float32
  # 1 = a real token (BOS and EOS included), 0 = padding.
  np.testing.assert_array_equal(out["text_token_mask"], (tokens != text.PAD_ID))
  for key in ("image_token_emb", "text_token_emb"):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
  # The pooled outputs stay.
  assert out["image_emb"].shape == out["text_emb"].shape == (4, c.model.embed_dim)


def test_token_embeddings_project_the_patch_tokens(setup):
  """image_token_emb = normalise(patch tokens @ kernel): the class token is left out."""
  p, out = setup.params, setup.out
  kernel = np.asarray(p["img_token_proj"]["proj"]["kernel"].value)
  assert kernel.shape == (32, D_TOK)
  assert p["img_token_proj"]["proj"]["kernel"].names == ("embed", "proj")
  assert "bias" not in p["img_token_proj"]["proj"]
  tokens = np.asarray(out["image_tokens"])
  assert tokens.shape[1] == N_PATCH
  ref = tokens @ kernel
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(out["image_token_emb"], ref, atol=1e-5)
  kernel = np.asarray(p["txt_token_proj"]["proj"]["kernel"].value)
  ref = np.asarray(out["text_tokens"]) @ kernel
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(out["text_token_emb"], ref, atol=1e-5)


def test_real_tokens_do_not_depend_on_padding(setup):
  """The same captions in a longer (more padded) or shorter batch: identical token
  embeddings at the real positions."""
  model, params, toks = setup.model, setup.params, np.asarray(setup.batch["text"])
  n = int((toks != 0).sum(1).max())
  short = np.ascontiguousarray(toks[:, :n])
  run = jax.jit(lambda t: model.apply({"params": params}, t,
                                      method="embed_text_tokens"))
  emb_s, tok_s, mask_s = run(short)
  np.testing.assert_allclose(emb_s, setup.out["text_emb"], atol=1e-5)
  full_tok = np.asarray(setup.out["text_token_emb"])[:, :n]
  real = np.asarray(mask_s) > 0
  np.testing.assert_allclose(np.asarray(tok_s)[real], full_tok[real], atol=1e-5)


def test_methods_and_predict_fns_match_the_outputs(setup):
  fns, params, out = setup.fns, setup.params, setup.out
  assert interface.can_embed_tokens(setup.model)
  assert {"embed_image_tokens", "embed_text_tokens", "token_scores"} <= set(fns)
  assert common.scores_tokens(fns)
  with jax.set_mesh(setup.mesh):
    img = fns["embed_image_tokens"](params, setup.batch["image"])
    txt, mask = fns["embed_text_tokens"](params, setup.batch["text"])
    i2t, t2i = fns["token_scores"](img, txt, mask, length=24)
  np.testing.assert_allclose(img, out["image_token_emb"], atol=1e-6)
  np.testing.assert_allclose(txt, out["text_token_emb"], atol=1e-6)
  np.testing.assert_array_equal(mask, out["text_token_mask"])
  ref_i2t, ref_t2i = dense_scores(img, txt, mask)
  np.testing.assert_allclose(i2t, ref_i2t, atol=1e-5)
  np.testing.assert_allclose(t2i, ref_t2i, atol=1e-5)


def test_families_and_settings_without_token_embeddings():
  c = filip_config(token_embed_dim=0)
  assert "image_token_emb" not in models.output_names(c.model)
  assert not interface.can_embed_tokens(models.build_model(c.model))
  assert models.output_switch("two_tower", "text_token_mask") == (
      "config.model.token_embed_dim=256")
  coca = filip_config(name="coca")
  with pytest.raises(errors.ConfigError, match=r"token_embed_dim is set, but model "
                                               r"'coca'.*token_embed_dim=0"):
    models.check_config(coca.model)
  c.objectives = {"filip": 1.0}
  with pytest.raises(errors.ConfigError, match="token_embed_dim=256"):
    validation.validate(c)


# ------------------------------------------------------------------------- evaluators


def test_blocked_scores_equal_dense_numpy(setup):
  """7 images x 11 texts in blocks of 4 (padded images, padded and trimmed texts)."""
  fns, params = setup.fns, setup.params
  rng = np.random.default_rng(1)
  images = rng.normal(size=(7, 32, 32, 3)).astype(np.float32)
  words = ["red", "blue", "circle", "square", "big", "small", "left", "top", "a"]
  texts = [" ".join(rng.choice(words, size=rng.integers(1, 7))) for _ in range(11)]
  with jax.set_mesh(setup.mesh):
    tt = common.embed_text_tokens(fns, params, texts, 4)
    i2t, t2i = common.image_token_scores(fns, params, images, 4, tt)
    img = in_blocks_of_4(fns["embed_image_tokens"], params, images)
  tokens = setup.tokenizer.tokenize(texts, 24)
  longest = int((tokens != 0).sum(1).max())
  assert tt.length == min(-(-longest // 8) * 8, 24) < 24  # trimmed, rounded up
  assert tt.counts == [4, 4, 3]
  txt = np.concatenate([np.asarray(b[0]) for b in tt.blocks])[:11]
  mask = np.concatenate([np.asarray(b[1]) for b in tt.blocks])[:11]
  np.testing.assert_array_equal(mask, tokens != 0)
  ref_i2t, ref_t2i = dense_scores(img, txt, mask)
  assert i2t.shape == t2i.shape == (7, 11)
  np.testing.assert_allclose(i2t, ref_i2t, atol=1e-5)
  np.testing.assert_allclose(t2i, ref_t2i, atol=1e-5)


def test_recall_from_scores_matches_recall_from_embeddings():
  rng = np.random.default_rng(2)
  img, txt = rng.normal(size=(6, 4)), rng.normal(size=(10, 4))
  owner = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 0])  # image 5 has no text
  ref = metrics.retrieval_recall(img, txt, owner, ks=(1, 2, 5))
  assert metrics.retrieval_recall_from_scores(img @ txt.T, None, owner,
                                              ks=(1, 2, 5)) == ref
  # Directions use their own matrix: i2t ranks rows of the first, t2i columns of the
  # second.
  s = img @ txt.T
  got = metrics.retrieval_recall_from_scores(s, -s, owner, ks=(1, 2, 5))
  flipped = metrics.retrieval_recall(img, -txt, owner, ks=(1, 2, 5))
  assert got == {k: (ref if k.startswith("i2t") else flipped)[k] for k in ref}
  with pytest.raises(ValueError, match="must both be"):
    metrics.retrieval_recall_from_scores(s, s[:, :3], owner)


def test_zeroshot_and_retrieval_score_token_wise(setup):
  """End to end on shapes: the evaluators take the FILIP path (counted calls) and
  give the metrics of dense NumPy scores (s^I averaged over each class's prompts;
  retrieval i2t by s^I, t2i by s^T)."""
  c, fns, params = setup.config, dict(setup.fns), setup.params
  calls = {"token_scores": 0, "embed_text": 0}

  def counting(name):
    fn = fns[name]
    def wrapped(*a, **kw):
      calls[name] += 1
      return fn(*a, **kw)
    return wrapped
  fns = dict(fns, token_scores=counting("token_scores"),
             embed_text=counting("embed_text"))
  evals = evaluation.eval_configs(c)
  results = evaluation.run_evals(evals, fns, params, 0, mesh=setup.mesh,
                                 names=["zeroshot", "retrieval"])
  assert calls["token_scores"] > 0 and calls["embed_text"] == 0

  with jax.set_mesh(setup.mesh):
    # Zero-shot reference.
    zcfg = evals["zeroshot"]
    ds, source = common.load_eval_set(zcfg)
    images, examples = common.load_images(ds)
    tmpl = templates_lib.resolve(zcfg.templates, zcfg.source, source, "t")
    prompts = [tmpl.prompts(n) for n in source.class_names]
    flat = [p for ps in prompts for p in ps]
    img = in_blocks_of_4(fns["embed_image_tokens"], params, images)
    txt, mask = in_blocks_of_4(fns["embed_text_tokens"], params, fns["tokenize"](flat))
    i2t, _ = dense_scores(img, txt, mask)
    starts = np.cumsum([0] + [len(p) for p in prompts])
    scores = np.stack([i2t[:, a:b].mean(1) for a, b in zip(starts[:-1], starts[1:])], 1)
    labels = np.array([e["label"] for e in examples])
    ref = metrics.topk_accuracy(scores, labels, ks=(1, 5))
    for k in ("top1", "top5"):
      assert results[f"eval/zeroshot/{k}"] == pytest.approx(ref[k]), k

    # Retrieval reference.
    ds, _ = common.load_eval_set(evals["retrieval"])
    images, examples = common.load_images(ds)
    texts = [t for e in examples for t in e["text"]]
    owner = np.array([i for i, e in enumerate(examples) for _ in e["text"]])
    img = in_blocks_of_4(fns["embed_image_tokens"], params, images)
    txt, mask = in_blocks_of_4(fns["embed_text_tokens"], params, fns["tokenize"](texts))
  i2t, t2i = dense_scores(img, txt, mask)
  ref = metrics.retrieval_recall_from_scores(i2t, t2i, owner)
  for k, v in ref.items():
    assert results[f"eval/retrieval/{k}"] == pytest.approx(v), k
  assert results["eval/retrieval/num_texts"] == len(texts)


# ------------------------------------------------------------------------------ FLOPs


def test_flops_of_a_tiny_filip_config_are_pinned():
  c = filip_config()
  c.objectives = {"filip": 1.0}
  b, n, l, d, e = c.batch_size, N_PATCH, 24, D_TOK, c.model.embed_dim
  w_img = w_txt = 32
  mlp = 64
  # Hand-written: ViT (patch embed + 1 block over n + cls), text (1 block over l),
  # pooled + token projections, token-wise similarity row (B x N x L x d).
  block = lambda t, w: 4 * t * w * w + 2 * t * t * w + 2 * t * w * mlp
  vit = n * 8 * 8 * 3 * w_img + block(n + 1, w_img)
  txt = block(l, w_txt)
  heads = (w_img + w_txt) * e + d * (n * w_img + l * w_txt)
  logits = b * n * l * d
  expected = {"image": vit, "text": txt, "decoder": 0, "heads": heads,
              "logits": logits}
  assert flops.forward_macs(c) == expected
  assert expected == {"image": 256064, "text": 233472, "decoder": 0,
                      "heads": 11264, "logits": 24576}
  assert flops.train_flops_per_sample(c) == 6.0 * 525376
  assert flops.token_similarity_macs(c) == logits
  # FILIP with CLIP as well: both logits; without FILIP selected: pooled only.
  c.objectives = {"filip": 1.0, "clip": 0.5}
  assert flops.forward_macs(c)["logits"] == logits + b * e
  c.objectives = {"clip": 1.0}
  assert flops.forward_macs(c)["logits"] == b * e
  # Patch dropout shortens N in the similarity too; evaluation (train=False) does not.
  c.objectives = {"filip": 1.0}
  c.model.image.patch_dropout = 0.5
  assert flops.forward_macs(c)["logits"] == b * 8 * l * d
  assert flops.forward_macs(c, train=False)["logits"] == logits
  # The objective's own count agrees.
  assert filip.filip_logits_macs(c) == flops.token_similarity_macs(c)


@pytest.mark.slow  # ~20 s: compiles a train step
def test_filip_count_matches_xla_cost_analysis():
  c = filip_config(token_embed_dim=64)
  c.objectives = {"filip": 1.0}
  c.evals = {}
  # Wide enough that matmuls dominate the elementwise ops XLA also counts.
  c.model.image.update(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8)
  c.model.text.update(width=128, depth=2, mlp_dim=512, num_heads=2)
  c.model.embed_dim = 128
  test_flops.assert_analytic_matches_xla(c)
