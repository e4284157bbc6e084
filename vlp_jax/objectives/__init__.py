"""Training objectives; importing this package registers them in `OBJECTIVES`."""
from vlp_jax import errors
from vlp_jax.objectives import combine
from vlp_jax.objectives import caption  # pylint: disable=unused-import
from vlp_jax.objectives import contrastive  # pylint: disable=unused-import
from vlp_jax.objectives import filip  # pylint: disable=unused-import
from vlp_jax.objectives import m3ae  # pylint: disable=unused-import
from vlp_jax.objectives import multipositive  # pylint: disable=unused-import
from vlp_jax.objectives import prior  # pylint: disable=unused-import
from vlp_jax.objectives import pyramidclip  # pylint: disable=unused-import
from vlp_jax.objectives import siglip2  # pylint: disable=unused-import
from vlp_jax.objectives import soft_targets  # pylint: disable=unused-import
from vlp_jax.objectives import tcl  # pylint: disable=unused-import
from vlp_jax.registry import OBJECTIVES


def check_config(config) -> None:
  """Every selected objective is registered, its options pass its `check`, and the
  model produces what it reads."""
  from vlp_jax import models  # pylint: disable=g-import-not-at-top
  from vlp_jax.models import view_outputs  # pylint: disable=g-import-not-at-top
  produced = models.produced_outputs(config)
  for name in config.objectives.keys():
    check = OBJECTIVES.info(name)["check"]
    if check is not None:
      try:
        check(combine.options(config, name))
      except (ValueError, TypeError) as e:
        raise errors.ConfigError(str(e)) from None
    prior.check_data(config, name)  # 'ref_probs' needs config.data.ref_probs.
    # A teacher output 'teacher_NAME' is the model's NAME (vlp_jax/train/teacher.py).
    # A queue's rows ('queue/NAME') come from the train state (vlp_jax/train/queue.py).
    reads = [r.removeprefix("teacher_") for r in OBJECTIVES.info(name)["reads"]
             if not r.startswith("queue/")]
    missing = [r for r in reads if r not in produced]
    for output in missing:
      group = view_outputs.view_group(output)
      embeds_views = hasattr(models.family(config.model.name), "view_outputs")
      if group is not None and embeds_views:
        raise errors.ConfigError(
            f"Objective '{name}' reads the view output '{output}', which needs the "
            f"view group '{group[1]}' in config.data.{group[0]} (configured: "
            f"{sorted((config.data.get(group[0]) or {}).keys())}); add it, e.g. "
            f"--config.data.{group[0]}.{group[1]}.count=1 for images (see "
            "vlp_jax/data/views.py).")
      switch = models.output_switch(config.model.name, output)
      makers = models.producers(output, config.model)
      hint = (f"set {switch}" if switch else f"models that do: {makers}" if makers
              else "no registered model does")
      raise errors.ConfigError(
          f"Objective '{name}' reads the model output '{output}', which model "
          f"'{config.model.name}' does not produce (it produces {sorted(produced)}); "
          f"{hint}. Change config.model.name or config.objectives.")
