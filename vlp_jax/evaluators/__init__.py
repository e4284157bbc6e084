"""Evaluators: `fn(predict_fns, params, cfg) -> metrics`, registered by name."""
from vlp_jax.evaluators import captioning, retrieval, zeroshot  # pylint: disable=unused-import
