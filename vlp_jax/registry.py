"""Name -> constructor registries for models, objectives, sources and evaluators.

Usage::

    @OBJECTIVES.register("clip")
    def clip_loss(outputs, batch, cfg): ...

    OBJECTIVES.get("clip")
"""
import difflib
from typing import Callable, Dict

from vlp_jax import errors


class Registry:
  """A named table of callables with helpful errors for unknown names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._table: Dict[str, Callable] = {}

  def register(self, name: str):
    """Decorator registering `fn` under `name`; duplicate names are an error."""
    def deco(fn):
      if name in self._table:
        raise ValueError(f"{self.kind} '{name}' is registered twice.")
      self._table[name] = fn
      return fn
    return deco

  def get(self, name: str) -> Callable:
    if name not in self._table:
      close = difflib.get_close_matches(name, list(self._table), n=1)
      hint = f" Did you mean '{close[0]}'?" if close else ""
      raise errors.ConfigKeyError(
          f"Unknown {self.kind} '{name}'.{hint} Registered: {sorted(self._table)}.")
    return self._table[name]

  def names(self):
    return sorted(self._table)

  def __contains__(self, name):
    return name in self._table


MODELS = Registry("model")
OBJECTIVES = Registry("objective")
SOURCES = Registry("data source")
EVALUATORS = Registry("evaluator")
