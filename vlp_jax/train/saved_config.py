"""The config a trained run was saved with (WORKDIR/config.json, `loop._write_config`)
and its model for inference, for tools that load a workdir (tools/curate.py,
tools/prior_probs.py, tools/caption.py)."""
import json
import os

import ml_collections

from vlp_jax import errors


def load(workdir: str, hint: str = "the workdir of a trained vlp_jax run "
         "(main.py --workdir=...)") -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict; WorkdirError naming the problem and `hint`
  (what to pass instead) when the workdir or its config.json is missing."""
  if not os.path.isdir(workdir):
    raise errors.WorkdirError(f"Workdir not found: '{workdir}'. Pass {hint}.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise errors.WorkdirError(f"'{workdir}' has no config.json: pass {hint}.")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.WorkdirError(f"'{path}' is not valid JSON ({e}); pass {hint}.") from e


def load_experiment(config: ml_collections.ConfigDict, workdir: str, step=None):
  """(Experiment, params, step, where they came from) of the run in `workdir` with
  its `config` (`load`), for inference: no evaluators; checkpoint `step` (None: the
  newest good one) as `main.py --mode=eval` picks it (`loop.eval_params`)."""
  from vlp_jax.train import loop  # pylint: disable=g-import-not-at-top
  config.evals = {}
  exp = loop.Experiment(config, workdir)
  params, got, where = loop.eval_params(exp, workdir, step)
  return exp, params, got, where
