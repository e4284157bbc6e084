"""PRIOR (prioritised captioning): the loss against the paper's equations written as a
plain loop, its reductions, the frozen reference (teacher from another run's
checkpoint, momentum 1.0), the text-only decoder pass, the precomputed path, and
the two recipes' 2-step runs on shapes (configs/prior_ref_lm_b16.py, then
configs/prior_coca_b16.py with its workdir)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_flops, test_train, tool_modules
from vlp_jax import cli, errors, validation
from vlp_jax.data import pipeline, ref_probs as ref_probs_lib
from vlp_jax.objectives import caption, combine, prior
from vlp_jax.perf import method_flops
from vlp_jax.train import (checkpoint, init_from, loop, metric_writer as metrics_lib,
                           step as step_lib, teacher as teacher_lib)



# ------------------------------------------------------------------ the loss itself


def loop_loss(logits, tokens, ref_p, alpha=1.0, normalize="caption", min_weight=0.0,
              pad=0):
  """The paper's equations, one token at a time: w_i = (1 - P_ref)^alpha; per caption
  L_b = -sum_i [k w_i / sum_j w_j] log P_theta(t_i); batch = sum_b L_b / sum_b k_b
  (normalize='batch': k w_i / sum_j w_j over the whole batch)."""
  logits, tokens, ref_p = (np.asarray(x, np.float64) for x in (logits, tokens, ref_p))
  b_size, length, _ = logits.shape
  rows = []  # (b, i, w, -log p)
  for b in range(b_size):
    for i in range(1, length):
      t = int(tokens[b, i])
      if t == pad:
        continue
      z = logits[b, i - 1]
      logp = z[t] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
      w = max((1.0 - ref_p[b, i - 1]) ** alpha, min_weight)
      rows.append((b, w, -logp))
  total_k = len(rows)
  loss = 0.0
  for b in range(b_size):
    mine = [r for r in rows if r[0] == b] if normalize == "caption" else rows
    k, s = len(mine), sum(r[1] for r in mine)
    for r in rows:
      if r[0] == b:
        loss += (k * r[1] / s if s > 0 else 1.0) * r[2]
  return loss / total_k


def random_case(seed=0, b=4, length=9, vocab=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32) * 2
  tokens = rng.integers(1, vocab, size=(b, length)).astype(np.int32)
  for row, n in enumerate([9, 6, 3, 7][:b]):  # Real lengths (BOS included).
    tokens[row, n:] = 0
  ref = rng.uniform(0.0, 1.0, size=(b, length - 1)).astype(np.float32)
  return logits, tokens, ref


@pytest.mark.parametrize("alpha,normalize,min_weight", [
    (1.0, "caption", 0.0), (2.0, "caption", 0.0), (1.0, "batch", 0.0),
    (0.5, "caption", 0.3)])
def test_loss_matches_the_equations_token_by_token(alpha, normalize, min_weight):
  logits, tokens, ref = random_case()
  got, metrics = prior.prior_loss(logits, tokens, ref, alpha, normalize, min_weight)
  want = loop_loss(logits, tokens, ref, alpha, normalize, min_weight)
  assert float(got) == pytest.approx(want, rel=1e-5)
  plain, _ = caption.caption_loss_from_logits(logits, tokens)
  assert float(metrics["caption_ce"]) == pytest.approx(float(plain), rel=1e-6)
  assert abs(float(got) - float(plain)) > 1e-3  # The weights do something.


def test_weights_average_to_one_per_caption_and_follow_the_reference():
  _, tokens, ref = random_case(1)
  mask = (tokens[:, 1:] != 0).astype(np.float32)
  v = np.asarray(prior.token_weights(ref, mask))
  np.testing.assert_allclose((v * mask).sum(1) / mask.sum(1), 1.0, rtol=1e-6)
  assert np.all(v[mask == 0] == 0)
  # A token the text alone predicts better gets less weight (same caption).
  row = v[0]
  order = np.argsort(ref[0])
  assert np.all(np.diff(row[order]) <= 1e-7)
  vb = np.asarray(prior.token_weights(ref, mask, normalize="batch"))
  assert (vb * mask).sum() / mask.sum() == pytest.approx(1.0, rel=1e-6)
  # All weights zero (every token certain): uniform.
  v0 = np.asarray(prior.token_weights(np.ones_like(ref), mask))
  np.testing.assert_array_equal(v0, mask)


def test_equal_weights_are_the_plain_caption_loss():
  logits, tokens, ref = random_case(2)
  plain, acc = caption.caption_loss_from_logits(logits, tokens)
  for probs, alpha in ((ref, 0.0), (np.full_like(ref, 0.3), 1.0)):
    got, m = prior.prior_loss(logits, tokens, probs, alpha=alpha)
    assert float(got) == pytest.approx(float(plain), rel=1e-6, abs=0)
    assert float(m["token_acc"]) == float(acc)


def test_the_reference_gets_no_gradient():
  logits, tokens, _ = random_case(3)
  ref_logits = np.random.default_rng(4).normal(size=logits.shape).astype(np.float32)
  fn = prior.OBJECTIVES.get("prior")

  def loss(cap, ref):
    out = {"caption_logits": cap, "teacher_text_lm_logits": ref}
    return fn(out, {"text": jnp.asarray(tokens)}, {})[0]
  g_cap, g_ref = jax.grad(loss, argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(ref_logits))
  assert np.all(np.asarray(g_ref) == 0) and np.abs(np.asarray(g_cap)).max() > 1e-4
  # ... though the reference does set the loss.
  assert float(loss(logits, ref_logits)) != float(loss(logits, 3 * ref_logits))


def test_options_are_checked():
  with pytest.raises(ValueError, match="normalize='token' is not one of"):
    prior.check_options({"normalize": "token"})
  with pytest.raises(ValueError, match=r"unknown options \['alpah'\]"):
    prior.check_options({"alpah": 1.0}, "prior_data")
  with pytest.raises(ValueError, match="alpha=-1"):
    prior.check_options({"alpha": -1})


# --------------------------------------------------------- model, teacher, FLOPs


def tiny_prior_config():
  c = test_train.tiny_config()
  c.objectives = {"clip": 1.0, "prior": 2.0}
  c.teacher.update(params=["txt/.*", "decoder/.*", "vocab_proj/.*"], momentum=1.0)
  return c


def test_text_lm_logits_ignore_the_image(ref_run):
  ref_dir, c, _ = ref_run
  params = _checkpoint_state(ref_dir, c).params
  model = loop.Experiment(c, "/unused", jax.devices()[:1]).model
  rng = np.random.default_rng(0)
  length, size = c.model.text.context_length, c.data.image_size
  text = jnp.asarray(rng.integers(3, c.model.text.vocab_size, (2, length)), jnp.int32)
  image = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  fn = jax.jit(lambda p, b: model.apply({"params": p}, b))
  a = fn(params, {"image": image, "text": text})
  b = fn(params, {"image": image[::-1], "text": text})
  np.testing.assert_array_equal(a["text_lm_logits"], b["text_lm_logits"])
  assert np.abs(np.asarray(a["caption_logits"] - b["caption_logits"])).max() > 1e-4
  # Without any image at all: the same text-only logits.
  c_only = fn(params, {"text": text})
  np.testing.assert_allclose(c_only["text_lm_logits"], a["text_lm_logits"], atol=1e-6)


@pytest.mark.slow  # ~9 s: XLA cost analysis of two compiled teacher passes + a step.
def test_teacher_pass_computes_only_the_text_decoder():
  """XLA drops the image tower from the teacher's pass: its compiled FLOPs with and
  without the image in the batch are equal, and method_flops counts that pass."""
  c = tiny_prior_config()
  exp = loop.Experiment(c, "/unused", jax.devices()[:1])
  params, teacher = exp.abstract.params, exp.abstract.teacher  # Shapes only.
  text = jax.ShapeDtypeStruct((8, 24), jnp.int32)
  image = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  fn = jax.jit(lambda p, t, b: teacher_lib.outputs(
      exp.model, p, t, b, ("teacher_text_lm_logits",)))

  def flops_of(batch):
    x = fn.lower(params, teacher, batch).compile().cost_analysis()
    return (x[0] if isinstance(x, (list, tuple)) else x)["flops"]
  assert flops_of({"image": image, "text": text}) == pytest.approx(
      flops_of({"text": text}), rel=1e-3)
  extra = method_flops.extra_train_macs(c)
  assert extra["teacher"] == (method_flops.text_lm_macs(c) + 1 * (
      c.model.text.depth * test_flops.flops.block_macs(24, 32, 64)))
  # The analytic count of the whole step against XLA's.
  test_flops.assert_analytic_matches_xla(c)


def test_momentum_one_keeps_the_teacher_bitwise():
  t = {"a": jnp.array([-0.0, 1.5, -2.25], jnp.float32),
       "b": jnp.array([3.0, -0.0], jnp.bfloat16)}
  p = {"a": jnp.array([1.0, jnp.nan, jnp.inf], jnp.float32),
       "b": jnp.array([7.0, 1.0], jnp.bfloat16)}
  out = jax.jit(teacher_lib.ema_update)(t, p, 1.0)
  for k in t:
    assert np.asarray(out[k]).tobytes() == np.asarray(t[k]).tobytes()
  moved = teacher_lib.ema_update(t, p, 0.5)
  assert float(moved["b"][0]) == 5.0


# -------------------------------------------- the two recipes and the reference run


def _run(config, workdir):
  loop.run(config, workdir)
  return [r for r in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r]


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
  """configs/prior_ref_lm_b16.py:runlocal, 2 steps at batch 8 on shapes."""
  workdir = str(tmp_path_factory.mktemp("prior_ref"))
  c = cli.load_config_file("configs/prior_ref_lm_b16.py:runlocal")
  c.update(batch_size=8, total_steps=2, checkpoint_every=2, log_every=1, plot=False)
  c.evals = {}
  rows = _run(c, workdir)
  return workdir, c, rows


def prior_config(ref_dir, extra=""):
  c = cli.load_config_file(f"configs/prior_coca_b16.py:runlocal,ref={ref_dir}{extra}")
  c.update(batch_size=8, total_steps=2, checkpoint_every=2, log_every=1, plot=False)
  c.evals = {}
  return c


def test_reference_recipe_trains_the_text_only_lm(ref_run):
  _, c, rows = ref_run
  assert dict(c.objectives) == {"text_lm": 1.0} and c.model.name == "coca"
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["text_lm/loss"]) and r["loss"] == r["text_lm/loss"]
    assert r["text_lm/loss"] == pytest.approx(math.log(c.model.text.vocab_size), rel=0.3)


def test_prior_recipe_needs_the_reference():
  """The recipe loads and validates without `ref=` (every recipe does), but training
  from scratch stops with an error naming the fix."""
  c = cli.load_config_file("configs/prior_coca_b16.py:runlocal")
  validation.validate(c)
  assert c.teacher.init_from.required and not c.teacher.init_from.workdir
  with pytest.raises(errors.ConfigError, match=r"set --config.teacher.init_from.workdir="
                                                r"WORKDIR \(configs/prior_coca_b16.py: "
                                                r"the ':ref=WORKDIR' argument"):
    init_from.load_teacher(c.teacher, None)
  c = cli.load_config_file("configs/prior_coca_b16.py:ref=/r")
  assert dict(c.objectives) == {"clip": 1.0, "prior": 2.0}
  assert c.teacher.momentum == 1.0 and c.teacher.init_from.workdir == "/r"
  assert list(c.teacher.params) == ["txt/.*", "decoder/.*", "vocab_proj/.*"]
  validation.validate(c)
  pre = cli.load_config_file("configs/prior_coca_b16.py:precomputed=/t")
  assert dict(pre.objectives) == {"clip": 1.0, "prior_data": 2.0}
  assert pre.data.ref_probs == "/t" and not teacher_lib.enabled(pre)
  validation.validate(pre)
  pre.data.ref_probs = ""
  with pytest.raises(errors.ConfigError, match=r"config.data.ref_probs is unset: write "
                                                r"the table with tools/prior_probs.py"):
    validation.validate(pre)


def test_prior_recipe_runs_with_a_frozen_reference(ref_run, tmp_path):
  """2 steps of configs/prior_coca_b16.py:runlocal at batch 8: the teacher is the
  reference run's checkpoint exactly, and stays so (momentum 1.0) while the student
  trains."""
  ref_dir, ref_cfg, _ = ref_run
  c = prior_config(ref_dir)
  rows = _run(c, str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["prior/loss"]) and r["teacher_momentum"] == 1.0
    assert r["loss"] == pytest.approx(r["clip/loss"] + 2 * r["prior/loss"], rel=1e-5)
    assert 0 < r["prior/ref_prob"] < 1 and r["prior/loss"] != r["prior/caption_ce"]
  ref_params = _checkpoint_state(ref_dir, ref_cfg).params
  exp = loop.Experiment(c, str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), c, cleanup=False)
  try:
    state, step = checkpoint.restore(manager, exp.abstract)
  finally:
    manager.close()
  assert step == 2
  want = teacher_lib.like(ref_params, state.teacher)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.teacher, want)
  moved = teacher_lib.like(state.params, state.teacher)
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(moved), jax.tree.leaves(want)))


def _checkpoint_state(workdir, config):
  exp = loop.Experiment(config, workdir)
  manager = checkpoint.make_manager(workdir, config, cleanup=False)
  try:
    return checkpoint.restore(manager, exp.abstract)[0]
  finally:
    manager.close()


def test_teacher_init_from_a_model_of_other_shapes_names_both(ref_run):
  ref_dir, _, _ = ref_run
  c = prior_config(ref_dir)
  c.model.text.mlp_dim = 128
  exp = loop.Experiment(c, "/unused")
  with pytest.raises(errors.CheckpointError, match=(
      r"config.teacher.init_from .*with other shapes .*"
      r"\(64, 256\)->\(64, 128\).*name checkpoint->model; allow with "
      r"teacher.init_from.allow_shape_mismatch")):
    init_from.load_teacher(c.teacher, exp.abstract, c.model)
  c.teacher.init_from.workdir = "/no/such/ref"
  with pytest.raises(FileNotFoundError, match=r"config.teacher.init_from.workdir="
                                              r"'/no/such/ref' has no checkpoints/"):
    init_from.load_teacher(c.teacher, exp.abstract, c.model)
  c.teacher.init_from.update(workdir="", required=False)
  assert init_from.load_teacher(c.teacher, exp.abstract) is exp.abstract


# --------------------------------------------------------------- precomputed path


def _tool():
  return tool_modules.load("prior_probs")


@pytest.fixture(scope="module")
def table(ref_run, tmp_path_factory):
  ref_dir, _, _ = ref_run
  out = str(tmp_path_factory.mktemp("prior_table") / "ref_probs")
  summary = _tool().compute(ref_dir, out, "shapes", size=64, batch_size=64)
  assert summary["distinct"] > 8
  return out


def test_both_paths_give_the_same_loss(ref_run, table):
  """The in-step frozen reference ('prior': the teacher loaded from the reference run
  by config.teacher.init_from, its text-only pass) and the precomputed field
  ('prior_data': batch['ref_probs'] from tools/prior_probs.py via
  config.data.ref_probs) on the same pipeline batch and caption logits."""
  ref_dir, ref_cfg, _ = ref_run
  c = prior_config(ref_dir)
  c.data.update(size=64, ref_probs=table)
  c.objectives = {"prior": 1.0, "prior_data": 1.0}
  validation.validate(c)
  exp = loop.Experiment(c, "/unused", jax.devices()[:1])
  teacher = init_from.load_teacher(c.teacher, exp.abstract, c.model).teacher
  ref_params = _checkpoint_state(ref_dir, ref_cfg).params
  # Student params unlike the reference's: the teacher's must replace them.
  params = jax.tree.map(lambda x: x * 1.5 + 0.1, ref_params)
  it = iter(pipeline.train_dataset(c, pipeline.make_tokenizer(c.data)))
  batch, _ = pipeline.split_bad_counts(next(it))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith("_")}
  assert batch["ref_probs"].shape == batch["text"].shape
  objectives = step_lib.objectives_from_config(c)
  logits = jax.random.normal(jax.random.PRNGKey(0), batch["text"].shape + (
      c.model.text.vocab_size,))

  @jax.jit
  def losses(params, teacher, b, logits):
    out = {"caption_logits": logits}
    out.update(teacher_lib.outputs(exp.model, params, teacher, b,
                                   ("teacher_text_lm_logits",)))
    metrics = {o.name: combine.call(o, out, b)[1] for o in objectives}
    return metrics, prior.target_probs(out["teacher_text_lm_logits"], b["text"])
  m, probs = losses(params, teacher, batch, logits)
  # Only the teacher's params reach its pass: other student params change nothing,
  # though the student's own text-only logits do differ.
  _, probs_ref = losses(ref_params, teacher, batch, logits)
  np.testing.assert_array_equal(np.asarray(probs), np.asarray(probs_ref))
  own = exp.model.apply({"params": params}, {"text": batch["text"]})["text_lm_logits"]
  assert not np.allclose(np.asarray(prior.target_probs(own, batch["text"])),
                         np.asarray(probs), atol=1e-3)
  for key in ("loss", "ref_prob", "max_weight"):
    assert float(m["prior"][key]) == pytest.approx(float(m["prior_data"][key]),
                                                   rel=2e-5), key
  assert float(m["prior"]["loss"]) != float(m["prior"]["caption_ce"])
  # The table's rows are the reference's probabilities of the batch's captions.
  real = np.asarray(batch["text"][:, 1:]) != 0
  np.testing.assert_allclose(np.asarray(batch["ref_probs"])[:, 1:][real],
                             np.asarray(probs)[real], rtol=2e-5)


def test_table_lookup_errors_name_the_fix(table):
  t = ref_probs_lib.Table(table)
  t.check(t.tokenizer, t.context_length)
  with pytest.raises(errors.DataError, match="rerun tools/prior_probs.py with"):
    t.check("clip", t.context_length)
  with pytest.raises(errors.DataError, match="not in the reference probabilities"):
    t.lookup(np.full((2, t.context_length), 5, np.int32))
  _, tokens, probs = t.arrays()
  assert isinstance(probs, np.memmap)  # Workers share the pages.
  got = t.lookup(tokens[[3, 0, 3]])
  np.testing.assert_array_equal(got, probs[[3, 0, 3]])
  assert np.all(probs[:, 0] == 1.0) and np.all(probs[tokens == 0] == 1.0)
  with pytest.raises(errors.ConfigError, match="exists .*--overwrite"):
    ref_probs_lib.save(table, tokens, probs, t.tokenizer, t.context_length)
  with pytest.raises(errors.DataError, match="no meta.json"):
    ref_probs_lib.Table(os.path.dirname(table))


@pytest.mark.slow  # ~1 CPU minute more: the precomputed variant of the recipe.
def test_precomputed_recipe_runs(table, tmp_path):
  c = cli.load_config_file(f"configs/prior_coca_b16.py:runlocal,precomputed={table}")
  c.update(batch_size=8, total_steps=2, checkpoint_every=0, log_every=1, plot=False,
           evals={})
  c.data.size = 64
  assert not teacher_lib.enabled(c)
  rows = _run(c, str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["prior_data/loss"]) for r in rows)


def test_teacher_init_from_is_validated():
  c = test_train.tiny_config()
  c.teacher.init_from.workdir = "/ref"
  with pytest.raises(errors.ConfigError, match="config.teacher.params is empty"):
    validation.validate(c)
  c.teacher.params = ["txt/.*"]
  validation.validate(c)
  c.teacher.init_from.checkpoint = "/ref/checkpoints/2"
  with pytest.raises(errors.ConfigError, match="either 'workdir' or 'checkpoint'"):
    validation.validate(c)
  c.teacher.init_from.update(checkpoint="", include=["("])
  with pytest.raises(errors.ConfigError, match=r"teacher.init_from.include: invalid regex"):
    validation.validate(c)


def test_ref_probs_field_is_deterministic_and_resumes(tmp_path):
  """config.data.ref_probs adds 'ref_probs' [B, L] = the table's rows of the batch's
  captions; the iterator's state resumes the same batches (field included)."""
  from vlp_jax.data import decode, sources  # pylint: disable=g-import-not-at-top
  c = cli.load_config_file("configs/prior_coca_b16.py:runlocal,ref=/x")
  c.batch_size, c.data.size = 8, 64
  tok = pipeline.make_tokenizer(c.data)
  src = sources.make_source("shapes", "train", 64, c.seed, c.data.image_size)
  caps = [x for i in range(len(src)) for x in decode.clean_captions(src[i]["text"])]
  rows = np.unique(tok.tokenize(caps, c.model.text.context_length), axis=0)
  probs = np.random.default_rng(0).uniform(size=rows.shape).astype(np.float32)
  path = str(tmp_path / "t")
  ref_probs_lib.save(path, rows, probs, c.data.tokenizer, c.model.text.context_length)
  c.data.ref_probs = path
  table = ref_probs_lib.Table(path)
  it = iter(pipeline.train_dataset(c, tok))
  b0 = next(it)
  state = it.get_state()
  b1, b2 = next(it), next(it)
  for b in (b0, b1, b2):
    assert b["ref_probs"].shape == b["text"].shape and b["ref_probs"].dtype == np.float32
    np.testing.assert_array_equal(b["ref_probs"], table.lookup(b["text"]))
  again = iter(pipeline.train_dataset(c, tok))
  again.set_state(state)
  r1 = next(again)
  np.testing.assert_array_equal(r1["text"], b1["text"])
  np.testing.assert_array_equal(r1["ref_probs"], b1["ref_probs"])
  # A table made with another context length is refused at start-up.
  c.model.text.context_length = 16
  with pytest.raises(errors.DataError, match="context length 24, but this run uses"):
    pipeline.train_dataset(c, tok)
