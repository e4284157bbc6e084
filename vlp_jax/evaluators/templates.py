"""Moved to `vlp_jax/data/templates.py` (training turns class labels into prompts with
it too, and data must not import evaluators); re-exported here for old imports."""
from vlp_jax.data.templates import *  # pylint: disable=wildcard-import,unused-wildcard-import
