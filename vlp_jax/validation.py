"""The whole check of a config before anything runs: the schema (`config.validate`),
then each selected implementation's own checks, where its registry lives (the model
family, the objectives against the model's outputs, the evaluators' options) and the
data checks. Batch arithmetic, which needs the mesh, is `batch_plan.py`."""
from vlp_jax import config as config_lib
from vlp_jax import errors


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
  check_teacher_reads(config)
  check_queue(config)
  mixture.check_config(config)  # Mixture entries, captions_per_image, class_templates.
  if evals and config.evals:
    from vlp_jax import evaluators  # pylint: disable=g-import-not-at-top
    evaluators.check_config(config)


def check_queue(config) -> None:
  """`config.queue`'s entries name teacher outputs the model produces, and the
  objectives read only queues that exist (vlp_jax/train/queue.py)."""
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import queue, teacher  # pylint: disable=g-import-not-at-top
  queue.check_config(config)
  produced = models.produced_outputs(config)
  for name, output in queue.entries(config).items():
    if teacher.student_name(output) not in produced:
      raise errors.ConfigError(
          f"config.queue.entries['{name}'] = '{output}', but the model does not produce "
          f"'{teacher.student_name(output)}' for this config (it produces "
          f"{sorted(produced)}).")


def check_teacher_reads(config) -> None:
  """Objectives that read teacher outputs ('teacher_*') need `config.teacher.params`."""
  from vlp_jax.registry import OBJECTIVES  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import teacher  # pylint: disable=g-import-not-at-top
  if teacher.enabled(config):
    return
  for name in config.objectives.keys():
    reads = [r for r in OBJECTIVES.info(name)["reads"] if teacher.is_teacher_output(r)]
    if reads:
      raise errors.ConfigError(
          f"Objective '{name}' reads the momentum teacher's output '{reads[0]}', but "
          "config.teacher.params is empty (no teacher): set it to the parameters the "
          "teacher copies, e.g. ['.*'] (all) or ['img/.*', 'img_proj/.*'].")
