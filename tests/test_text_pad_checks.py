"""Text padding and pooling against the tokenizer: the start-up checks
(`startup_checks.check_tokenizer`, run by `loop.Experiment`) and the CLIP recipes'
'argmax' pooling without a padding mask (CLIP's id 0 is both padding and '!')."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import siglip_b16
from vlp_jax import cli, errors, validation
from vlp_jax.data import pipeline
from vlp_jax.models import builders, text
from vlp_jax.train import loop, startup_checks

SPM = "tests/fixtures/tokenizers/siglip_tiny.model"  # Pads with EOS = 1.
EOS = 19  # Highest id of the tiny vocabularies below, as CLIP's 49407.


def override(c, flag):
  """Applies `--config.a.b=v` to `c` (v typed as the current value)."""
  path, value = flag[len("--config."):].split("=", 1)
  *parents, key = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  kind = type(node[key])
  node[key] = (value.lower() == "true") if kind is bool else kind(value)


def load(spec, *flags):
  c = cli.load_config_file(spec)
  for f in flags:
    override(c, f)
  return c


def check(c):
  validation.validate(c, evals=False)
  startup_checks.check_tokenizer(c, pipeline.make_tokenizer(c.data))


@pytest.mark.parametrize("spec", [f"configs/{n}_b16.py{a}" for n in
                                  ("clip", "filip", "unicl", "coca", "siglip")
                                  for a in ("", ":runlocal")] +
                         ["configs/unicl_b16.py:prefix", "configs/demo.py"])
def test_the_recipes_pass_the_checks(spec):
  check(load(spec))


def test_argmax_needs_eos_as_the_highest_id():
  c = load("configs/clip_b16.py", "--config.data.tokenizer=bytes")
  fix = "--config.model.text.pool=eos --config.model.text.padding_mask=True"
  with pytest.raises(errors.ConfigError, match=re.escape(
      "--config.data.tokenizer=bytes has EOS id 2 and its highest id is 258")) as e:
    check(c)
  assert "pool='argmax'" in str(e.value) and fix in str(e.value)
  for f in fix.split():  # The named fix works.
    override(c, f)
  check(c)


def test_siglip_recipe_with_the_documented_siglip_tokenizer_flags():
  doc = " ".join(siglip_b16.__doc__.split())
  start = doc.index("--config.data.tokenizer=siglip:")
  flags = re.findall(r"--config\.[\w.]+=\S+", doc[start:doc.index("(or a SigLIP 2")])
  flags = [f.replace("/path/spiece.model", SPM) for f in flags]
  assert len(flags) == 5 and f"--config.data.tokenizer=siglip:{SPM}" in flags
  check(load("configs/siglip_b16.py", *flags))
  # Without the pool / padding_mask flags the padding (EOS, 1) would count as text.
  c = load("configs/siglip_b16.py", *[f for f in flags if ".pool=" not in f
                                      and ".padding_mask=" not in f])
  with pytest.raises(errors.ConfigError, match=re.escape(
      "pads with id 1, but the model finds text padding by id 0 "
      "(model.text.padding_mask=True; model.text.pool='eos')")) as e:
    check(c)
  assert ("--config.model.text.pool=last --config.model.text.padding_mask=False"
          in str(e.value))
  override(c, "--config.model.text.padding_mask=False")  # 'eos' still reads id 0.
  with pytest.raises(errors.ConfigError, match=r"\(model.text.pool='eos'\)"):
    check(c)


@pytest.mark.parametrize("spec,flags,match", [
    ("configs/filip_b16.py", ("--config.model.text.pool=last",),
     "FILIP's token-wise similarity"),
    ("configs/unicl_b16.py:prefix", ("--config.model.text.pool=last",),
     "model.text.prefix_conditioning"),
    ("configs/coca_b16.py", ("--config.model.text.pool=last",
                             "--config.model.text.padding_mask=False"),
     "CoCa's 'vlp_jax' layout"),
])
def test_models_that_find_padding_by_id_0_whatever_the_options(spec, flags, match):
  flags = (f"--config.data.tokenizer=siglip:{SPM}", "--config.model.text.padding_mask"
           "=False") + flags
  c = load(spec, *flags)
  if "caption" in c.objectives:
    c.objective_cfg.caption = {"pad_id": 1}
  with pytest.raises(errors.ConfigError, match=r"pads with id 1.*by id 0 \(" + match +
                     r".*Use a tokenizer that pads with id 0") as e:
    check(c)
  assert "--config.model.text.pool=last" not in str(e.value)  # Would not fix it.
  assert ("--config.model.coca_layout=open_clip" in str(e.value)) == (
      c.model.name == "coca")


def test_vocab_and_caption_pad_checks_stay():
  c = load("configs/coca_b16.py:runlocal", "--config.data.tokenizer=bytes")
  with pytest.raises(errors.ConfigError, match=r"259 ids.*vocab_size=259"):
    check(c)
  c = load("configs/coca_b16.py", f"--config.data.tokenizer=siglip:{SPM}")
  with pytest.raises(errors.ConfigError, match="objective_cfg.caption.pad_id=1"):
    check(c)


def test_experiment_runs_the_checks():
  c = load("configs/clip_b16.py:runlocal", "--config.model.text.pool=argmax")
  with pytest.raises(errors.ConfigError, match="--config.data.tokenizer=words:shapes"):
    loop.Experiment(c, "/unused", jax.devices()[:1])


# ------------------------------------------------------ argmax pooling with CLIP's '!'

# BOS 1 .. EOS 19 rows with '!' (id 0, as padding) inside the caption.
BANG = np.array([[1, 5, 0, 7, EOS, 0, 0, 0],
                 [1, 0, 0, 4, 9, EOS, 0, 0],
                 [1, 5, 0, 7, 9, 11, 6, EOS],
                 [1, EOS, 0, 0, 0, 0, 0, 0]], np.int32)


def _tower(recipe, **update):
  """A tiny text tower with `recipe`'s text pooling / masking options."""
  cfg = load(recipe).model.text
  cfg.update(vocab_size=EOS + 1, width=16, depth=1, mlp_dim=32, num_heads=2,
             context_length=8, **update)
  tower = text.TextTransformer(**builders.text_kwargs(cfg, jnp.float32, prefix=True))
  params = jax.jit(tower.init)(jax.random.key(0), jnp.asarray(BANG))
  return jax.jit(lambda t: tower.apply(params, t))


def test_clip_recipe_pools_at_eos_and_attends_to_bang():
  apply = _tower("configs/clip_b16.py")
  pooled, feats = map(np.asarray, apply(jnp.asarray(BANG)))
  at_eos = feats[np.arange(len(BANG)), np.argmax(BANG, axis=1)]
  np.testing.assert_allclose(pooled, at_eos, atol=1e-6)
  # '!' is a token: swapping it for another word changes the embedding.
  other = BANG.copy()
  other[0, 2] = 13
  assert np.abs(np.asarray(apply(jnp.asarray(other))[0])[0] - pooled[0]).max() > 1e-4


def test_argmax_with_prefix_reads_eos_also_with_bang_and_overflow():
  """unicl_b16:prefix: the prefix moves EOS by its length; a row cut to make room
  for it keeps EOS last even when '!' (id 0) is inside the caption."""
  p = 2
  x = jnp.asarray(BANG, jnp.float32)[..., None]  # "Embeddings" carrying the token id.
  prefix = -jnp.ones((len(BANG), p, 1))
  out = text.insert_prefix(x, prefix, jnp.asarray(BANG), 8)
  pooled = text.pool_features(out, None, "argmax", jnp.asarray(BANG), p)
  np.testing.assert_array_equal(np.asarray(pooled)[:, 0], EOS)
  apply = _tower("configs/unicl_b16.py:prefix", prefix_length=p)
  pooled, feats = map(np.asarray, apply(jnp.asarray(BANG)))
  pos = np.minimum(np.argmax(BANG, axis=1) + p, 7)
  np.testing.assert_allclose(pooled, feats[np.arange(len(BANG)), pos], atol=1e-6)
  # The pooled position holds EOS: changing the word cut for the prefix changes nothing.
  cut = BANG.copy()
  cut[2, 6] = 13
  np.testing.assert_allclose(np.asarray(apply(jnp.asarray(cut))[0])[2], pooled[2],
                             atol=1e-6)
