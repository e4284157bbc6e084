"""Few-shot linear evaluation: closed-form ridge regression on frozen image features,
as big_vision's `evaluators/fewshot_lsr.py`.

For each seed and each k in `shots`, k training examples per class are drawn from
`train_split`; their features are standardised (train mean / std), a constant
feature of 100 is appended (an almost unregularised bias), and a least-squares
regression onto {-1, +1} one-hot targets with L2 penalty `l2_reg` is solved in closed
form (one eigendecomposition serves every penalty). Accuracy is the argmax's on the
evaluated `split`. With several `l2_reg` values, the one scoring best on `holdout`
further training examples per class (not among the shots) is used.

Options: train_split ('train'), train_size (0 = all; the images are held in memory
while embedded), shots ((1, 5, 10, 25)), l2_reg ((1024.0,), big_vision's 2**10),
holdout (5), seeds (3). Metrics: '{k}shot' (test accuracy, mean over seeds), with
several l2_reg values also '{k}shot_l2' (the chosen penalty, lower median over
seeds), and num_classes.
"""
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from vlp_jax import config as config_lib, errors
from vlp_jax.evaluators import features
from vlp_jax.registry import EVALUATORS

BIAS_CONSTANT = 100.0


class RidgeCache(NamedTuple):
  """The eigendecomposition of the (standardised, bias-padded) training problem:
  weights for penalty l2 are `lhs @ diag(1 / (eigs + l2)) @ rhs`."""
  eigs: np.ndarray
  lhs: np.ndarray
  rhs: np.ndarray
  mean: np.ndarray
  std: np.ndarray


def _design(x, mean, std):
  x = (np.asarray(x, np.float64) - mean) / std
  return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def ridge_cache(x, y, num_classes: int) -> RidgeCache:
  """Pre-computes the ridge regression of features `x` [N, D] onto labels `y` [N]:
  (X^T X + l2 I)^-1 X^T T when N >= D+1, else X^T (X X^T + l2 I)^-1 T, with X the
  standardised features plus the bias column and T = 2 one_hot(y) - 1."""
  x = np.asarray(x, np.float64)
  mean, std = features.moments(x)
  xd = _design(x, mean, std)
  t = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
  if xd.shape[0] >= xd.shape[1]:
    eigs, q = np.linalg.eigh(xd.T @ xd)
    lhs, rhs = q, q.T @ (xd.T @ t)
  else:
    eigs, q = np.linalg.eigh(xd @ xd.T)
    lhs, rhs = xd.T @ q, q.T @ t
  return RidgeCache(eigs, lhs, rhs, mean, std)


def ridge_weights(cache: RidgeCache, l2_reg: float) -> np.ndarray:
  """[D + 1, C] weights (the last row multiplies the bias constant)."""
  return (cache.lhs / (cache.eigs + l2_reg)[None, :]) @ cache.rhs


def ridge_predict(cache: RidgeCache, weights: np.ndarray, x) -> np.ndarray:
  """[N, C] regression outputs for features `x` (argmax = predicted class)."""
  return _design(x, cache.mean, cache.std) @ weights


def accuracy(cache, weights, x, y) -> float:
  return float(np.mean(np.argmax(ridge_predict(cache, weights, x), axis=1) == y))


def draw_shots(y, num_classes: int, shots: int, rng, extra: int = 0):
  """Indices of `shots` random examples of each class (fewer where a class has fewer),
  and of up to `extra` further ones per class (a held-out part)."""
  chosen, held = [], []
  for c in range(num_classes):
    idx = rng.permutation(np.nonzero(y == c)[0])
    chosen.append(idx[:shots])
    held.append(idx[shots:shots + extra])
  return np.concatenate(chosen), np.concatenate(held)


def fewshot_accuracy(train: features.Features, test: features.Features, shots: int,
                     l2_regs: Sequence[float], seed: int, holdout: int):
  """(test accuracy, chosen l2) of ridge regression on `shots` examples per class."""
  rng = np.random.default_rng(seed)
  select = len(l2_regs) > 1
  idx, held = draw_shots(train.y, train.num_classes, shots, rng,
                         holdout if select else 0)
  cache = ridge_cache(train.x[idx], train.y[idx], train.num_classes)
  best = l2_regs[0]
  if select and held.size:
    scores = [accuracy(cache, ridge_weights(cache, l2), train.x[held], train.y[held])
              for l2 in l2_regs]
    best = l2_regs[int(np.argmax(scores))]
  return accuracy(cache, ridge_weights(cache, best), test.x, test.y), best


OPTIONS = {"train_split": "train", "train_size": 0, "shots": (1, 5, 10, 25),
           "l2_reg": (1024.0,), "holdout": 5, "seeds": 3}
OPTION_RANGES = {
    "train_size": (True, lambda v: v >= 0, ">= 0", "training examples read; 0 = all"),
    "holdout": (True, lambda v: v >= 1, ">= 1",
                "held-out examples per class for choosing l2_reg"),
    "seeds": (True, lambda v: v >= 1, ">= 1", "random draws of the shots, averaged"),
}


def check(cfg, where):
  config_lib.check_numbers(cfg, where, OPTION_RANGES)
  shots, l2 = tuple(cfg.shots), tuple(cfg.l2_reg)
  if not shots or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                          for k in shots):
    raise errors.ConfigError(f"{where}.shots={shots!r} must be a non-empty list of "
                             "examples per class >= 1, e.g. (1, 5, 10, 25).")
  if not l2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and v > 0 for v in l2):
    raise errors.ConfigError(f"{where}.l2_reg={l2!r} must be a non-empty list of "
                             "penalties > 0, e.g. (1024.0,) or (1.0, 32.0, 1024.0).")
  if not isinstance(cfg.train_split, str) or not cfg.train_split:
    raise errors.ConfigError(f"{where}.train_split must name the split the shots "
                             "are drawn from, e.g. 'train'.")


@EVALUATORS.register("fewshot", options=OPTIONS, check=check)
def fewshot(predict_fns, params, cfg):
  """'{k}shot' accuracies of ridge regression on frozen image features."""
  where = f"config.evals.{cfg.get('name', cfg.type)}"
  train, test = features.train_and_test(predict_fns, params, cfg, where)
  num_classes = train.num_classes
  l2_regs = [float(v) for v in cfg.l2_reg]
  result = {}
  for k in cfg.shots:
    accs, chosen = [], []
    for seed in range(cfg.seeds):
      acc, l2 = fewshot_accuracy(train, test, k, l2_regs, seed, cfg.holdout)
      accs.append(acc)
      chosen.append(l2)
    result[f"{k}shot"] = float(np.mean(accs))
    if len(l2_regs) > 1:
      result[f"{k}shot_l2"] = sorted(chosen)[(len(chosen) - 1) // 2]
      logging.info("%s: %d-shot l2_reg chosen per seed: %s", where, k, chosen)
  result["num_classes"] = num_classes
  return result
