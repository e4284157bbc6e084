"""The whole check of a config before anything runs: the schema (`config.validate`),
then each selected implementation's own checks, where its registry lives (the model
family, the objectives against the model's outputs, the evaluators' options) and the
data checks. Batch arithmetic, which needs the mesh, is `batch_plan.py`."""
from vlp_jax import config as config_lib


def validate(config, evals: bool = True) -> None:
  """Raises a `vlp_jax.errors` error naming the first problem and its fix.

  `evals=False` skips the evaluators' checks (the benchmark, which runs none).
  """
  from vlp_jax import models, objectives  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import mixture, tokenizers  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  tokenizers.parse_spec(config.data.tokenizer)  # Its form; paths are read at start.
  models.check_config(config.model)
  objectives.check_config(config)
  mixture.check_config(config)  # Mixture entries, captions_per_image, class_templates.
  if evals and config.evals:
    from vlp_jax import evaluators  # pylint: disable=g-import-not-at-top
    evaluators.check_config(config)
