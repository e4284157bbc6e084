"""The model-family contract (`vlp_jax/models/interface.py`).

Families defined in this file are registered by name for one test each: an incomplete
one is rejected with a message naming it and what it lacks; a complete one builds,
trains in the benchmark, and its FLOPs are its own count (`forward_macs`,
`tower_macs`), with no model-name branch anywhere in between.
"""
import ast
import os
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import test_train
from vlp_jax import models, validation
from vlp_jax.models import interface
from vlp_jax.perf import benchmark, flops
from vlp_jax.registry import MODELS
from vlp_jax.train import predict

MODELS_DIR = os.path.join(os.path.dirname(models.__file__))


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
  """Registrations made by a test are undone after it."""
  MODELS.names()  # Registers the built-in families first.
  monkeypatch.setattr(MODELS, "_table", dict(MODELS._table))  # pylint: disable=protected-access
  monkeypatch.setattr(MODELS, "_info", dict(MODELS._info))  # pylint: disable=protected-access


def _outputs(cls, cfg):
  return frozenset({"image_emb", "text_emb", "logit_scale"})


def _tower_macs(cls, config, tower, train=True):
  m, s = config.model, config.data.image_size
  if tower == "image":
    return s * s * 3 * m.embed_dim
  return m.text.context_length * m.text.width * m.embed_dim


def _forward_macs(cls, config, train=True):
  return {"image": _tower_macs(cls, config, "image"),
          "text": _tower_macs(cls, config, "text"),
          "logits": config.batch_size * config.model.embed_dim}


def _setup(self):
  t = self.config.text
  self.img = nn.Dense(self.config.embed_dim, use_bias=False, dtype=self.dtype)
  self.tok = nn.Embed(t.vocab_size, t.width, dtype=self.dtype)
  self.txt = nn.Dense(self.config.embed_dim, use_bias=False, dtype=self.dtype)
  self.t = self.param("logit_scale", nn.initializers.constant(2.0), (), jnp.float32)


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _embed_image(self, images, train=False):
  x = images.reshape(images.shape[0], -1).astype(self.dtype)
  return _normalize(self.img(x)), x[:, None]


def _embed_text(self, tokens, train=False):
  feats = self.tok(tokens)
  return _normalize(self.txt(feats).mean(axis=1)), feats


def _call(self, batch, train=False):
  out = {"logit_scale": jnp.exp(self.t)}
  if "image" in batch:
    out["image_emb"], _ = self.embed_image(batch["image"], train)
  if "text" in batch:
    out["text_emb"], _ = self.embed_text(batch["text"], train)
  return out


# A complete minimal family: a linear map of the pixels and one of the mean token
# embedding, both to `embed_dim`, for the CLIP loss. Nothing but classmethods says
# what its FLOPs are.
PARTS = {"outputs": classmethod(_outputs), "forward_macs": classmethod(_forward_macs),
         "tower_macs": classmethod(_tower_macs), "setup": _setup,
         "embed_image": _embed_image, "embed_text": _embed_text, "__call__": _call}


def make_family(name, drop=(), **extra):
  """A flax module class named `name` with config/dtype fields and PARTS, less `drop`,
  plus `extra`."""
  body = {"__annotations__": {"config": ml_collections.ConfigDict, "dtype": Any},
          "__module__": __name__, "__qualname__": name}
  body.update({k: v for k, v in PARTS.items() if k not in drop}, **extra)
  return type(name, (nn.Module,), body)


def config_for(name):
  c = test_train.tiny_config()
  c.model.name = name
  c.objectives = {"clip": 1.0}
  return c


@pytest.mark.parametrize("attr,needs", [
    ("embed_text", r"embed_text\(tokens, train=False\) -> \(embedding, features\)"),
    ("forward_macs", r"classmethod forward_macs\(config, train=True\)"),
    ("tower_macs", r"classmethod tower_macs\(config, tower"),
    ("outputs", r"classmethod outputs\(cfg\)"),
])
def test_incomplete_family_is_rejected_by_name(attr, needs):
  MODELS.register("contract_partial", replace=True)(
      make_family(f"LinearPairWithout_{attr}", drop=(attr,)))
  c = config_for("contract_partial")
  for fail in (lambda: models.build_model(c.model), lambda: validation.validate(c),
               lambda: flops.train_flops_per_sample(c),
               lambda: flops.tower_train_flops_per_sample(c, "image")):
    with pytest.raises(TypeError, match=r"Model family 'contract_partial' \(.*"
                       rf"LinearPairWithout_{attr}\).*interface\.py.*{needs}"):
      fail()
  # The broken family does not break config errors about the other families.
  assert models.producers("caption_logits", c.model) == ["coca"]


def test_flop_count_and_half_a_captioner_must_be_declared_right():
  # FLOPs are counted without building the model: an instance method is not enough.
  odd = make_family("Odd", forward_macs=lambda self, config, train=True: {},
                    decode=lambda self, tokens, context, train=False: tokens)
  MODELS.register("contract_odd", replace=True)(odd)
  with pytest.raises(TypeError, match=r"'contract_odd'.*forward_macs as a classmethod.*"
                     r"both encode_image and decode for generation \(it has only decode\)"):
    models.build_model(config_for("contract_odd").model)
  with pytest.raises(TypeError, match="flax.linen.Module subclass"):
    interface.check_family("fn", lambda config, dtype: None)


def test_complete_family_builds_trains_and_counts_its_own_flops():
  MODELS.register("contract_linear", replace=True)(make_family("LinearPair"))
  c = config_for("contract_linear")
  validation.validate(c)
  s, d, t = c.data.image_size, c.model.embed_dim, c.model.text
  image, text = s * s * 3 * d, t.context_length * t.width * d
  # What perf/ reports is the family's own count, whatever its parts are called.
  assert flops.forward_macs(c) == {"image": image, "text": text,
                                   "logits": c.batch_size * d}
  assert flops.train_flops_per_sample(c) == 6.0 * (image + text + c.batch_size * d)
  assert flops.tower_train_flops_per_sample(c, "text") == 6.0 * text
  # The benchmark's train step and its MFU go through it.
  bench = benchmark.StepBenchmark(c)
  rec = bench.record(bench.time(1))
  assert rec["model_gflops_per_sample"] * 1e9 == flops.train_flops_per_sample(c)
  assert rec["model_gflops_per_sample_by_part_fwd"] == {
      "image": 2 * image / 1e9, "text": 2 * text / 1e9,
      "logits": 2 * c.batch_size * d / 1e9}
  assert np.isfinite(rec["final_loss"])
  # Evaluators' predictors: embeddings, and no generation (no encode_image/decode).
  tokenizer = types.SimpleNamespace(tokenize=None, decode=None)  # Never called here.
  fns = predict.make_predict_fns(bench.setup.model, tokenizer, t.context_length)
  assert "generate" not in fns
  params = bench.state.params
  with jax.set_mesh(bench.setup.mesh):  # As the train loop runs its evaluators.
    emb = fns["embed_image"](params, jnp.zeros((2, s, s, 3)))
    txt = fns["embed_text"](params, jnp.ones((2, t.context_length), jnp.int32))
  assert emb.shape == txt.shape == (2, d)


def test_built_in_families_follow_the_interface_and_stand_alone():
  names = MODELS.names()
  assert {"two_tower", "coca"} <= set(names)
  family_modules = {}
  for name in names:
    cls = MODELS.get(name)
    assert interface.problems(cls) == [], name
    family_modules[cls.__module__] = name
  assert interface.can_generate(MODELS.get("coca"))
  assert not interface.can_generate(MODELS.get("two_tower"))
  # One file per family: no family module imports another, and none is imported by
  # the model-layer helpers; those never import perf/.
  for fname in os.listdir(MODELS_DIR):
    if not fname.endswith(".py"):
      continue
    module = "vlp_jax.models." + fname[:-3]
    tree = ast.parse(open(os.path.join(MODELS_DIR, fname)).read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        imported |= {a.name for a in node.names}
    assert not any(m.startswith("vlp_jax.perf") for m in imported), fname
    if fname != "__init__.py":
      assert not imported & (set(family_modules) - {module}), (fname, imported)
  # perf/flops.py dispatches through the registry: no family is named there.
  src = open(flops.__file__).read()
  assert not any(f'"{n}"' in src or f"'{n}'" in src for n in names)
