"""Name -> implementation registries for models, objectives, sources and evaluators.

Usage::

    @OBJECTIVES.register("clip", reads=("image_emb", "text_emb", "logit_scale"),
                         batch_global=True)
    def clip_loss(outputs, batch, cfg): ...

    OBJECTIVES.get("clip")      # the function
    OBJECTIVES.info("clip")     # {'reads': (...), 'batch_global': True, ...}

A registration may carry keyword metadata (what an objective reads, an evaluator's
options, ...); each registry names the keys its entries must declare. A lookup first
imports the package that registers the built-in entries, so it never depends on
which modules happen to have been imported before.
"""
import difflib
import importlib
from typing import Any, Callable, Dict, Sequence

from vlp_jax import errors


class Registry:
  """A named table of implementations and their declared metadata."""

  def __init__(self, kind: str, package: str, required: Sequence[str] = (),
               optional: Dict[str, Any] = None):
    self.kind = kind
    self.package = package  # Imported before any lookup: it registers the built-ins.
    self.required = tuple(required)
    self.optional = dict(optional or {})
    self._table: Dict[str, Callable] = {}
    self._info: Dict[str, Dict[str, Any]] = {}

  def register(self, name: str, replace: bool = False, **info):
    """Decorator registering `fn` under `name` with metadata `info`.

    A second registration of `name` is an error unless `replace` (tests). Metadata
    must hold this registry's `required` keys and no keys beyond `required` and
    `optional` (whose defaults fill what is not given).
    """
    missing = [k for k in self.required if k not in info]
    unknown = sorted(set(info) - set(self.required) - set(self.optional))
    if missing or unknown:
      raise TypeError(
          f"Registering {self.kind} '{name}': " +
          (f"declare {missing}; " if missing else "") +
          (f"unknown declarations {unknown}; " if unknown else "") +
          f"a {self.kind} declares {list(self.required) + sorted(self.optional)}.")

    def deco(fn):
      if name in self._table and not replace:
        raise ValueError(f"{self.kind} '{name}' is registered twice.")
      self._table[name] = fn
      self._info[name] = dict(self.optional, **info)
      return fn
    return deco

  def _load(self):
    importlib.import_module(self.package)

  def get(self, name: str) -> Callable:
    """The implementation registered as `name`; an unknown name is a ConfigKeyError
    naming the closest registered one."""
    self._load()
    if name not in self._table:
      close = difflib.get_close_matches(name, list(self._table), n=1)
      hint = f" Did you mean '{close[0]}'?" if close else ""
      raise errors.ConfigKeyError(
          f"Unknown {self.kind} '{name}'.{hint} Registered: {sorted(self._table)}.")
    return self._table[name]

  def info(self, name: str) -> Dict[str, Any]:
    """The metadata `name` was registered with (a copy)."""
    self.get(name)
    return dict(self._info[name])

  def names(self):
    self._load()
    return sorted(self._table)

  def __contains__(self, name):
    self._load()
    return name in self._table


# Models: flax modules following `vlp_jax/models/interface.py`.
MODELS = Registry("model", "vlp_jax.models")
# Objectives: fn(outputs, batch, cfg) -> (loss, metrics). `reads`: the model outputs it
# uses; `batch_keys`: the batch entries it uses; `batch_global`: whether it needs every
# negative of the global batch (accumulation then caches what it reads for the whole
# batch, and it sees the whole batch's outputs). It is given only what it declares
# (`objectives/combine.py`).
# `check`: fn(options dict) raising ValueError on a bad option (run at start-up by
# `objectives.check_config`, so a typo fails before anything compiles).
# `starts_at`: fn(options dict) -> the first step at which the objective is on, for
# objectives that are off (contribute nothing) before it; the train step then skips
# their work before that step (`train/step.py`).
OBJECTIVES = Registry("objective", "vlp_jax.objectives", required=("reads",),
                      optional={"batch_keys": (), "batch_global": False, "check": None,
                                "starts_at": None})
SOURCES = Registry("data source", "vlp_jax.data.sources")
# Evaluators: fn(predict_fns, params, cfg) -> metrics. `options`: its own keys in
# config.evals.NAME with their defaults; `check`: fn(cfg, where) validating them.
EVALUATORS = Registry("evaluator", "vlp_jax.evaluators",
                      optional={"options": {}, "check": None})
