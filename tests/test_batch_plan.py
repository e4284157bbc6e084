"""batch_plan: the batch arithmetic is resolved and checked once, in one message."""
import pytest

from vlp_jax import batch_plan, errors


def test_plan_numbers():
  plan = batch_plan.make(96, accum_steps=3, process_count=2, process_index=1,
                         data_shards=4)
  assert (plan.per_process, plan.process_offset) == (48, 48)
  assert (plan.micro_batch, plan.per_shard) == (32, 8)


@pytest.mark.parametrize("kwargs, unit", [
    (dict(accum_steps=3), 3),
    (dict(data_shards=8), 8),
    (dict(process_count=3), 3),
    (dict(accum_steps=2, data_shards=4, process_count=3), 24),
])
def test_indivisible_batch_is_one_error_with_valid_sizes(kwargs, unit):
  batch = 4 * unit + 1
  with pytest.raises(errors.ConfigError) as e:
    batch_plan.make(batch, **kwargs)
  msg = str(e.value)
  assert f"config.batch_size={batch}" in msg and f"multiple of {unit}" in msg
  assert f"use e.g. {4 * unit} or {5 * unit}" in msg
  batch_plan.make(4 * unit, **kwargs)  # The suggestion is valid.


@pytest.mark.parametrize("key, value", [("global_batch", 0), ("accum_steps", -1),
                                        ("accum_steps", 1.5)])
def test_nonpositive_numbers(key, value):
  kwargs = {"global_batch": 8, key: value}
  with pytest.raises(errors.ConfigError, match="must be a positive integer"):
    batch_plan.make(**kwargs)


def test_train_setup_reports_the_mesh():
  from tests import test_train  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import setup  # pylint: disable=g-import-not-at-top
  c = test_train.tiny_config()
  c.batch_size, c.accum_steps = 6, 4
  with pytest.raises(errors.ConfigError, match=r"batch_size=6 .* multiple of 4; use "
                     r"e.g. 4 or 8"):
    setup.TrainSetup(c)
