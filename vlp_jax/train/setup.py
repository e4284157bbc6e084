"""What the trainer and the benchmark build from a config: model, optimizer, mesh,
shardings and the jitted train step. Imports nothing from the data pipeline (grain),
so the benchmark runs where only jax/flax/optax are installed."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax import batch_plan, validation
from vlp_jax import sharding
from vlp_jax.models import build_model
from vlp_jax.train import freeze, optim, state as state_lib, step as step_lib
from vlp_jax.train import queue as queue_lib, teacher as teacher_lib


class TrainSetup:
  """Everything the train step needs, derived from a validated config."""

  def __init__(self, config, devices=None):
    validation.validate(config, evals=False)
    self.config = config
    self.model = build_model(config.model)
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.total_steps)
    self.tx = freeze.apply(self.tx, config.frozen)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config.sharding_rules)
    self.batch = batch_plan.from_mesh(config, self.mesh, self.rules)
    # The initialiser is traced once here; create_state reuses the boxed shardings.
    boxed = state_lib.abstract_state(self.model, self.tx, config, self.mesh)
    self._boxed_shardings = boxed[1]
    self.abstract = state_lib.unboxed_abstract_state(self.model, self.tx, config,
                                                     self.mesh, abstract=boxed)
    self.state_shardings = jax.tree.map(lambda a: a.sharding, self.abstract)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.objectives = step_lib.objectives_from_config(config)
    # step -> momentum of the EMA teacher (None without one; train/teacher.py).
    self.teacher_momentum = teacher_lib.momentum_schedule(config)
    self._normalize = None  # jitted `normalize_images`, built on the first uint8 batch
    self.step_fn = step_lib.make_train_step(
        self.model, self.objectives, self.tx, self.schedule, self.state_shardings,
        self.batch_sharding, accum_steps=config.accum_steps,
        teacher_momentum=self.teacher_momentum,
        queue_entries=queue_lib.entries(config) or None)

  def create_state(self):
    return state_lib.create_state(self.model, self.tx, self.config, self.mesh,
                                  shardings=self._boxed_shardings)

  def global_batch(self, local_batch):
    """This process's rows (numpy) -> global arrays sharded over the batch axes; uint8
    images ('image', 'views/*': config.data.normalize_on_device) are normalised on
    device (`normalize_images`), float ones pass through."""
    batch = sharding.make_global_batch(local_batch, self.mesh, self.rules)
    raw = {k: v for k, v in batch.items() if is_raw_image(k, v)}
    if not raw:
      return batch
    if self._normalize is None:
      self._normalize = jax.jit(functools.partial(
          normalize_images, constants=image_constants(self.config.data.normalization)))
    return {**batch, **self._normalize(raw)}

  def contexts(self):
    """(mesh, logical-axis rules) context managers the step is traced under."""
    return jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)


def is_raw_image(key: str, value) -> bool:
  """Whether batch entry `key` is a uint8 image array the device normalises."""
  return (key == "image" or key.startswith("views/")) and value.dtype == np.uint8


def image_constants(kind: str):
  """(mean, std) float32 [3] of normalisation `kind` (data/transforms.py; imported
  only here, with uint8 batches, so synthetic benchmarks need no data stack)."""
  from vlp_jax.data import transforms  # pylint: disable=g-import-not-at-top
  return transforms.normalization_constants(kind)


def normalize_images(images, constants):
  """{key: uint8 [..., 3]} -> float32 (x / 255 - mean) / std (within 1e-6 of the
  host's `transforms.normalize`)."""
  mean, std = (jnp.asarray(c, jnp.float32) for c in constants)
  return {k: (v.astype(jnp.float32) / 255.0 - mean) / std for k, v in images.items()}
