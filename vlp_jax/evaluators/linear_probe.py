"""Linear probe: multinomial logistic regression on frozen image features (as CLIP's
linear-probe evaluation), fitted full-batch with L-BFGS (optax).

Features of `train_split` and the evaluated `split` are standardised with the
training mean / std. The weight decay (L2 penalty wd/2 |W|^2 on the weights, not the
bias, added to the mean cross-entropy) is swept over `weight_decays` on a validation
set: `val_split` when given, else a random `val_fraction` of the training examples.
The probe is then refitted on all training examples with the best value and scored
on `split`.

Options: train_split ('train'), train_size (0 = all; the images are held in memory
while embedded), val_split ('' = hold out val_fraction of train), val_fraction (0.2),
weight_decays ((1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)), steps (L-BFGS iterations, 100),
seed (0). Metrics: top1, top5, weight_decay (the chosen one), val_top1 (its
validation accuracy; with a sweep), num_train, num_classes.
"""
import functools

import numpy as np
from absl import logging

from vlp_jax import config as config_lib, errors
from vlp_jax.evaluators import features, metrics
from vlp_jax.registry import EVALUATORS


def _fit_fn():
  """The jitted `fit` (built on first use: importing evaluators imports no JAX)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
  def fit(x, y, weight_decay, num_classes: int, steps: int):
    def loss(p):
      logits = x @ p["w"] + p["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
              "b": jnp.zeros((num_classes,), x.dtype)}
    # Backtracking (Armijo) line search: compiles faster than the zoom search, and the
    # convex loss keeps L-BFGS's curvature pairs positive without the Wolfe condition.
    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=20, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
      p, state = carry
      value, grad = value_and_grad(p, state=state)
      updates, state = opt.update(grad, state, p, value=value, grad=grad,
                                  value_fn=loss)
      return (optax.apply_updates(p, updates), state), value

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None,
                                  length=steps)
    return params
  return fit


_FIT = []


def fit(x, y, weight_decay, num_classes: int, steps: int):
  """{'w' [D, C], 'b' [C]} minimising the mean softmax cross-entropy of features `x`
  [N, D] with integer labels `y` [N] plus weight_decay / 2 * |w|^2, by `steps`
  full-batch L-BFGS steps (backtracking line search) from zero; the loss is convex."""
  if not _FIT:
    _FIT.append(_fit_fn())
  return _FIT[0](np.asarray(x, np.float32), np.asarray(y, np.int32),
                 np.float32(weight_decay), num_classes=num_classes, steps=steps)


def predict(params, x) -> np.ndarray:
  """[N, C] logits."""
  return np.asarray(x, np.float32) @ params["w"] + params["b"]


def probe(train_x, train_y, num_classes, weight_decay, steps):
  """The fitted probe of (standardised) features, as host arrays."""
  p = fit(train_x, train_y, weight_decay, num_classes, steps)
  return {k: np.asarray(v) for k, v in p.items()}


def sweep(train_x, train_y, val_x, val_y, num_classes, weight_decays, steps):
  """(best weight decay, its validation top-1, every value's top-1)."""
  scores = []
  for wd in weight_decays:
    p = probe(train_x, train_y, num_classes, wd, steps)
    scores.append(metrics.topk_accuracy(predict(p, val_x), val_y, ks=(1,))["top1"])
  best = int(np.argmax(scores))  # Ties: the first (smallest, if sorted) value.
  return weight_decays[best], scores[best], scores


OPTIONS = {"train_split": "train", "train_size": 0, "val_split": "",
           "val_fraction": 0.2, "weight_decays": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
           "steps": 100, "seed": 0}
OPTION_RANGES = {
    "train_size": (True, lambda v: v >= 0, ">= 0", "training examples read; 0 = all"),
    "val_fraction": (False, lambda v: 0 < v < 1, "in (0, 1)",
                     "training examples held out to choose the weight decay"),
    "steps": (True, lambda v: v >= 1, ">= 1", "L-BFGS iterations"),
}


def check(cfg, where):
  config_lib.check_numbers(cfg, where, OPTION_RANGES)
  wds = tuple(cfg.weight_decays)
  if not wds or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        and v >= 0 for v in wds):
    raise errors.ConfigError(f"{where}.weight_decays={wds!r} must be a non-empty list "
                             "of penalties >= 0, e.g. (1e-4, 1e-3, 1e-2).")
  if not isinstance(cfg.train_split, str) or not cfg.train_split:
    raise errors.ConfigError(f"{where}.train_split must name the split the probe is "
                             "trained on, e.g. 'train'.")


def _split_train(train: features.Features, fraction: float, seed: int, where: str):
  """(fit part, validation part) of `train`: a random `fraction` held out."""
  n = len(train.y)
  n_val = int(round(n * fraction))
  if n_val < 1 or n - n_val < 1:
    raise errors.DataError(
        f"{where}: {n} training examples cannot be split by val_fraction={fraction}; "
        "read more (train_size) or give a val_split.")
  perm = np.random.default_rng(seed).permutation(n)
  pick = lambda i: features.Features(train.x[i], train.y[i], train.num_classes)
  return pick(perm[n_val:]), pick(perm[:n_val])


@EVALUATORS.register("linear_probe", options=OPTIONS, check=check)
def linear_probe(predict_fns, params, cfg):
  """top-1 / top-5 test accuracy of a logistic-regression probe on frozen features."""
  where = f"config.evals.{cfg.get('name', cfg.type)}"
  train, test = features.train_and_test(predict_fns, params, cfg, where)
  num_classes = train.num_classes
  wds = [float(v) for v in cfg.weight_decays]
  if len(wds) > 1:
    if cfg.val_split:
      fit_part = train
      val = features.labelled_features(predict_fns, params, cfg, cfg.val_split, 0,
                                       where)
    else:
      fit_part, val = _split_train(train, cfg.val_fraction, cfg.seed, where)
    fx, vx = features.standardize(fit_part.x, val.x)
    wd, val_top1, scores = sweep(fx, fit_part.y, vx, val.y, num_classes, wds,
                                 cfg.steps)
    logging.info("%s: validation top-1 per weight decay %s", where,
                 dict(zip(wds, scores)))
  else:
    wd, val_top1 = wds[0], None
  tx, sx = features.standardize(train.x, test.x)
  p = probe(tx, train.y, num_classes, wd, cfg.steps)
  result = metrics.topk_accuracy(predict(p, sx), test.y, ks=(1, 5))
  result.update(weight_decay=wd, num_train=len(train.y), num_classes=num_classes)
  if val_top1 is not None:
    result["val_top1"] = val_top1
  return result
