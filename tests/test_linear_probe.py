"""Linear probe (vlp_jax/evaluators/linear_probe.py): the L-BFGS fit reaches the
optimum of its convex objective (checked with SciPy), the known accuracy on separable
and on overlapping synthetic features, the weight-decay sweep, option checks."""
import numpy as np
import pytest
from scipy import optimize, special

from configs import common
from vlp_jax import config as config_lib, errors, validation
from vlp_jax.evaluators import features, linear_probe

STEPS = 60
# Every fit has these shapes: the jitted L-BFGS compiles once for the module.
N, D, C = 400, 8, 4


def _objective(x, y, num_classes, wd):
  """The probe's loss as a function of the flat (w, b), for SciPy."""
  d = x.shape[1]

  def f(theta):
    w = theta[:d * num_classes].reshape(d, num_classes)
    b = theta[d * num_classes:]
    logits = x @ w + b
    ce = np.mean(special.logsumexp(logits, axis=1) - logits[np.arange(len(y)), y])
    return ce + 0.5 * wd * np.sum(w ** 2)
  return f


def _gaussians(n, num_classes, dim, spread, seed):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(7).normal(size=(num_classes, dim)) * 2
  y = rng.integers(0, num_classes, n)
  return (centers[y] + rng.normal(size=(n, dim)) * spread).astype(np.float32), y


def test_fit_reaches_the_optimum_of_its_objective():
  x, y = _gaussians(N, C, D, 1.5, seed=0)  # Overlapping: a finite optimum.
  wd = 1e-2
  p = linear_probe.probe(x, y, C, wd, STEPS)
  f = _objective(x.astype(np.float64), y, C, wd)
  ref = optimize.minimize(f, np.zeros(D * C + C), method="L-BFGS-B",
                          options={"maxiter": 2000, "gtol": 1e-10, "ftol": 1e-14})
  ours = f(np.concatenate([p["w"].ravel(), p["b"]]).astype(np.float64))
  assert ours == pytest.approx(ref.fun, rel=1e-4)
  assert ours < f(np.zeros(D * C + C)) - 0.1  # It moved.


def test_separable_features_are_classified_perfectly():
  x, y = _gaussians(N, C, D, 0.3, seed=1)
  xt, yt = _gaussians(300, C, D, 0.3, seed=2)
  sx, st = features.standardize(x, xt)
  p = linear_probe.probe(sx, y, C, 1e-4, STEPS)
  assert np.mean(np.argmax(linear_probe.predict(p, st), 1) == yt) == 1.0


def test_overlapping_classes_reach_the_bayes_accuracy():
  # Two unit-variance Gaussians at -1 and +1 on one axis (+ noise axes; classes 2, 3
  # unused): the Bayes classifier thresholds at 0 and is right with probability
  # Phi(1) = 0.8413.
  rng = np.random.default_rng(3)

  def draw(n):
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, D))
    x[:, 0] += 2.0 * y - 1.0
    return x.astype(np.float32), y
  (x, y), (xt, yt) = draw(N), draw(20000)
  p = linear_probe.probe(x, y, C, 1e-4, STEPS)
  acc = np.mean(np.argmax(linear_probe.predict(p, xt), 1) == yt)
  assert acc == pytest.approx(0.8413, abs=0.015)


def test_sweep_picks_the_weight_decay_with_the_best_validation_accuracy():
  x, y = _gaussians(N, C, D, 1.0, seed=4)
  vx, vy = _gaussians(200, C, D, 1.0, seed=5)
  wd, top1, scores = linear_probe.sweep(x, y, vx, vy, C, [1e-4, 1e3], STEPS)
  # wd 1e3 shrinks the weights to ~0: near chance; the small one wins.
  assert wd == 1e-4 and top1 == scores[0] > scores[1] + 0.2


@pytest.mark.parametrize("key,value,pattern", [
    ("weight_decays", (), "weight_decays"), ("weight_decays", (-1.0,), "weight_decays"),
    ("steps", 0, "steps"), ("val_fraction", 1.0, "val_fraction"),
    ("train_size", -1, "train_size"),
])
def test_bad_options_are_config_errors(key, value, pattern):
  c = config_lib.default_config()
  c.evals = {"lp": common.eval_entry(type="linear_probe", source="shapes:classes")}
  c.evals.lp[key] = value
  with pytest.raises(errors.ConfigError, match=rf"config\.evals\.lp\.{pattern}"):
    validation.validate(c)
