"""Frozen parameters (`config.frozen`, e.g. LiT's `['img/.*']`).

The optimizer is split with `optax.multi_transform`: frozen parameters get
`optax.set_to_zero()` (zero updates, no optimizer state), the rest the configured
optimizer, whose clipping and weight decay therefore never see the frozen ones.
"""
import re

import flax.linen as nn
import jax
import optax


def path_str(path) -> str:
  """'/'-joined names of a pytree key path, e.g. 'img/encoder/block0/mlp/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def named_leaves(params):
  """{'/'-joined path: leaf} (flax partitioning boxes count as leaves)."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))}


def matches(name: str, patterns) -> bool:
  return any(re.fullmatch(p, name) for p in patterns)


def labels_fn(patterns):
  """params -> same tree of 'frozen' / 'trainable'; errors if a pattern matches nothing."""
  def labels(params):
    names = list(named_leaves(params))
    for p in patterns:
      if not any(re.fullmatch(p, n) for n in names):
        raise ValueError(
            f"config.frozen pattern {p!r} matches no parameter (it must match a whole "
            f"'/'-joined path). Parameters look like: {names[:6]}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if matches(path_str(path), patterns) else "trainable",
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return labels


def apply(tx: optax.GradientTransformation, patterns) -> optax.GradientTransformation:
  """`tx` for the trainable parameters, zero updates and no state for frozen ones."""
  if not patterns:
    return tx
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               labels_fn(list(patterns)))
