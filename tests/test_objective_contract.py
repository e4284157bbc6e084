"""Objectives declare what they read: the declarations drive accumulation's cache and
are checked at registration, at start-up (validation) and when an objective runs.

The 8-device counterpart of the accumulation test is
tests/multidevice/test_objective_contract_md.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import contract_objective, test_accumulate, test_train
from vlp_jax import errors, validation
from vlp_jax.data import pipeline
from vlp_jax.objectives import combine
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import accumulate, loop, state as state_lib, step as step_lib


def filip_config():
  c = contract_objective.config(test_train.tiny_config())
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  return c


@functools.cache
def filip_setup():
  config = filip_config()
  exp = loop.Experiment(config, "/unused", jax.devices()[:1])
  params = state_lib.create_state(exp.model, exp.tx, config, exp.mesh).params
  it = iter(pipeline.train_dataset(config, pipeline.make_tokenizer(config.data)))
  batch = jax.tree.map(jnp.asarray, next(it))
  return exp, params, batch


def test_declarations_reach_the_weighted_objectives():
  objectives = step_lib.objectives_from_config(filip_config())
  filip, clip = sorted(objectives, key=lambda o: o.name != contract_objective.NAME)
  assert filip.reads == contract_objective.READS and filip.batch_global
  assert filip.batch_keys == ("text",)
  assert clip.reads == ("image_emb", "text_emb", "logit_scale") and clip.batch_global
  caption = combine.from_registry("caption", 2.0)
  assert not caption.batch_global and caption.batch_keys == ("text",)
  # The cache: every batch-global read (scalars are dropped once their shapes are
  # known), nothing a per-example objective reads.
  assert accumulate.cached_output_names([filip, clip, caption]) == (
      "image_tokens", "text_tokens", "logit_scale", "image_emb", "text_emb")


def test_token_objective_accumulates_exactly():
  """A batch-global objective reading [B, N, W] token arrays: accum_steps=2 gives the
  gradient (every leaf, logit_scale included) and metrics of accum_steps=1."""
  exp, params, batch = filip_setup()
  objectives = step_lib.objectives_from_config(filip_config())
  rng = jax.random.PRNGKey(4)

  def grads(accum_steps):
    fn = jax.jit(lambda p, b: step_lib.gradients(p, exp.model, objectives, b, rng,
                                                 accum_steps))
    return jax.device_get(fn(params, batch))

  ref_g, ref_m = grads(1)
  g, m = grads(2)
  test_accumulate.assert_grads_close(g, ref_g)
  assert abs(float(ref_g["scale"]["logit_scale"])) > 1e-4
  test_accumulate.assert_close(g["scale"]["logit_scale"], ref_g["scale"]["logit_scale"])
  assert set(m) == set(ref_m) >= {"loss", "logit_scale", "contract_filip/loss",
                                  "contract_filip/i2t_acc", "clip/loss"}
  jax.tree.map(test_accumulate.assert_close, m, ref_m)
  # The token objective is not a copy of clip: it has a loss of its own.
  assert np.isfinite(float(ref_m["contract_filip/loss"]))
  assert abs(float(ref_m["contract_filip/loss"]) - float(ref_m["clip/loss"])) > 1e-3


def test_registration_without_reads_is_a_type_error():
  with pytest.raises(TypeError, match=r"Registering objective 'contract_no_reads': "
                                      r"declare \['reads'\]"):
    OBJECTIVES.register("contract_no_reads", replace=True, batch_global=True)
  assert "contract_no_reads" not in OBJECTIVES


def test_objective_reading_an_output_the_model_lacks_fails_validation():
  config = test_train.tiny_config()
  config.model.name = "two_tower"
  config.objectives = {"caption": 1.0}
  with pytest.raises(errors.ConfigError,
                     match=r"Objective 'caption' reads the model output "
                           r"'caption_logits'.*models that do: \['coca'\]"):
    validation.validate(config)
  config.model.name = "coca"
  validation.validate(config)


def _needs_labels(outputs, batch, cfg):
  del cfg
  loss = jnp.mean(outputs["image_emb"]) * jnp.mean(batch["labels"])
  return loss, {"loss": loss}


OBJECTIVES.register("contract_needs_labels", replace=True, reads=("image_emb",),
                    batch_keys=("labels",))(_needs_labels)


def _undeclared_read(outputs, batch, cfg):
  del batch, cfg
  outputs = jax.tree.map(jnp.asarray, outputs)  # Still only what it declared.
  loss = jnp.mean(outputs["image_emb"]) + jnp.mean(outputs["text_emb"])
  return loss, {"loss": loss}


OBJECTIVES.register("contract_undeclared", replace=True,
                    reads=("image_emb",))(_undeclared_read)

OUTPUTS = {"image_emb": jnp.ones((2, 3)), "text_emb": jnp.ones((2, 3)),
           "logit_scale": jnp.array(1.0)}


def test_missing_batch_key_is_a_clear_error():
  obj = combine.from_registry("contract_needs_labels")
  batch = {"image": jnp.zeros((2, 4, 4, 3)), "text": jnp.ones((2, 5), jnp.int32)}
  match = (r"Objective 'contract_needs_labels' needs the batch entry 'labels'.*"
           r"holds only \['image', 'text'\]")
  with pytest.raises(combine.InputError, match=match):
    combine.call(obj, OUTPUTS, batch)
  # The train step checks before its forward pass, with or without accumulation.
  with pytest.raises(combine.InputError, match=match):
    step_lib.compute_loss(None, None, [obj], batch, None)
  with pytest.raises(combine.InputError, match=match):
    accumulate.accumulated_grads(None, None, [obj], batch, None, 2)
  loss, _ = combine.call(obj, OUTPUTS, dict(batch, labels=jnp.full((2,), 2.0)))
  assert float(loss) == 2.0


def test_reading_an_undeclared_output_is_a_clear_error():
  obj = combine.from_registry("contract_undeclared")
  with pytest.raises(combine.InputError,
                     match=r"'contract_undeclared' read the model output 'text_emb' "
                           r"without declaring it"):
    combine.call(obj, OUTPUTS, {})
  # A declared output the model did not return.
  with pytest.raises(combine.InputError,
                     match=r"'contract_undeclared' reads the model output 'image_emb', "
                           r"which the model did not return"):
    combine.call(obj, {"text_emb": OUTPUTS["text_emb"]}, {})


def test_combine_names_metrics_and_weights():
  objectives = [combine.from_registry("clip", 1.0), combine.from_registry("caption", 2.0)]
  results = {"clip": (jnp.array(1.5), {"loss": 1.5, "i2t_acc": 0.5}),
             "caption": (jnp.array(0.25), {"loss": 0.25})}
  total, metrics = combine.combine(objectives, results,
                                   {"logit_scale": 10.0, "image_emb": None})
  assert float(total) == 2.0
  assert metrics == {"clip/loss": 1.5, "clip/i2t_acc": 0.5, "caption/loss": 0.25,
                     "loss": total, "logit_scale": 10.0}
  total, _ = combine.combine(objectives, results, {}, weights={"caption": 0.5})
  assert float(total) == 1.625


def _step_scaled(outputs, batch, cfg):
  del cfg
  loss = jnp.mean(outputs["image_emb"] ** 2) * (1.0 + batch["step"])
  return loss, {"loss": loss, "step": batch["step"].astype(jnp.float32)}


OBJECTIVES.register("contract_step", replace=True, reads=("image_emb",),
                    batch_keys=("step",), batch_global=True)(_step_scaled)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_train_step_gives_the_step_to_objectives_that_declare_it(accum_steps):
  """train_step adds batch['step'] (the step being computed); with accumulation every
  micro-batch sees the same scalar."""
  exp, params, batch = filip_setup()
  obj = combine.from_registry("contract_step")
  del params
  state = state_lib.create_state(exp.model, exp.tx, filip_config(), exp.mesh)
  state = state.replace(step=state.step + 6)
  new, metrics = jax.jit(lambda s, b: step_lib.train_step(
      s, b, model=exp.model, objectives=[obj], tx=exp.tx, schedule=lambda s: 0.0,
      accum_steps=accum_steps))(state, batch)
  assert float(metrics["contract_step/step"]) == 6.0
  assert int(new.step) == 7


@pytest.mark.parametrize("name,options,match", [
    ("clip", {"negative_smothing": 0.1}, r"Unknown option 'negative_smothing'.*Did you "
                                         r"mean 'negative_smoothing'"),
    ("clip", {"label_smoothing": 0.1, "negative_smoothing": 0.1}, r"set one of them"),
    ("unicl", {"same_image": 1}, r"same_image=1 must be True or False"),
    ("lightclip", {}, r"needs config.objective_cfg.lightclip.ramp_steps"),
    ("filip", {"block": 0}, r"filip.block=0 must be a positive integer"),
])
def test_bad_objective_options_fail_validation_before_anything_compiles(name, options,
                                                                        match):
  config = test_train.tiny_config()
  config.model.name = "two_tower"
  config.model.token_embed_dim = 8
  config.objectives = {name: 1.0}
  config.objective_cfg = {name: options}
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config)
