"""Few-shot ridge regression (vlp_jax/evaluators/fewshot.py, big_vision's fewshot_lsr):
the eigendecomposition shortcut against the plain normal equations, shot drawing,
the choice of the penalty on held-out examples, and the option checks."""
import numpy as np
import pytest

from configs import common
from vlp_jax import config as config_lib, errors, validation
from vlp_jax.evaluators import features, fewshot


def plain_ridge(x, y, num_classes, l2):
  """(X^T X + l2 I)^-1 X^T T with X = standardised x plus a column of 100."""
  mean, std = x.mean(0), x.std(0) + 1e-5
  xd = np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)
  t = 2.0 * np.eye(num_classes)[y] - 1.0
  w = np.linalg.solve(xd.T @ xd + l2 * np.eye(xd.shape[1]), xd.T @ t)
  return w, lambda z: np.concatenate([(z - mean) / std, np.full((len(z), 1), 100.0)],
                                     axis=1) @ w


@pytest.mark.parametrize("n,d", [(40, 6), (5, 12)])  # N >= D+1 and D+1 > N branches.
@pytest.mark.parametrize("l2", [0.5, 1024.0])
def test_ridge_matches_the_normal_equations(n, d, l2):
  rng = np.random.default_rng(n + d)
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
  y = rng.integers(0, 3, n)
  cache = fewshot.ridge_cache(x, y, 3)
  w = fewshot.ridge_weights(cache, l2)
  w_ref, predict_ref = plain_ridge(x, y, 3, l2)
  np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-9)
  z = rng.normal(size=(7, d))
  np.testing.assert_allclose(fewshot.ridge_predict(cache, w, z), predict_ref(z),
                             rtol=1e-6, atol=1e-9)


def test_draw_shots_takes_k_per_class_and_a_disjoint_holdout():
  y = np.array([0] * 10 + [1] * 3 + [2] * 8)
  idx, held = fewshot.draw_shots(y, 4, 5, np.random.default_rng(0), extra=4)
  assert np.bincount(y[idx], minlength=4).tolist() == [5, 3, 5, 0]
  assert np.bincount(y[held], minlength=4).tolist() == [4, 0, 3, 0]
  assert not set(idx) & set(held)
  idx2, _ = fewshot.draw_shots(y, 4, 5, np.random.default_rng(1))
  assert set(idx) != set(idx2)  # Another seed, other shots.


def _clusters(n, num_classes=4, dim=8, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(num_classes, dim)) * 3
  y = rng.integers(0, num_classes, n)
  x = centers[y] + rng.normal(size=(n, dim)) * spread
  return features.Features(x.astype(np.float32), y, num_classes)


def test_separable_clusters_are_classified_from_one_shot():
  train, test = _clusters(200, seed=1), _clusters(300, seed=2)
  for k in (1, 5):
    acc, l2 = fewshot.fewshot_accuracy(train, test, k, [1024.0], seed=0, holdout=5)
    assert acc == 1.0 and l2 == 1024.0


def test_several_penalties_are_chosen_on_held_out_examples():
  # 16 noisy dimensions, 10 shots: the penalties score differently on the held-out
  # part; the chosen one is its best, and the test accuracy is that penalty's.
  train = _clusters(600, dim=16, spread=3.0, seed=3)
  test = _clusters(400, dim=16, spread=3.0, seed=4)
  l2s = [1e-3, 30.0, 1e5]
  acc, l2 = fewshot.fewshot_accuracy(train, test, 10, l2s, seed=0, holdout=20)
  idx, held = fewshot.draw_shots(train.y, 4, 10, np.random.default_rng(0), extra=20)
  cache = fewshot.ridge_cache(train.x[idx], train.y[idx], 4)
  held_acc = [fewshot.accuracy(cache, fewshot.ridge_weights(cache, v), train.x[held],
                               train.y[held]) for v in l2s]
  assert len(set(held_acc)) > 1
  assert l2 == l2s[int(np.argmax(held_acc))]
  assert acc == fewshot.accuracy(cache, fewshot.ridge_weights(cache, l2), test.x, test.y)


@pytest.mark.parametrize("key,value,pattern", [
    ("shots", (0, 5), "shots"), ("shots", (), "shots"), ("l2_reg", (0.0,), "l2_reg"),
    ("l2_reg", (), "l2_reg"), ("seeds", 0, "seeds"), ("holdout", 0, "holdout"),
    ("train_split", "", "train_split"),
])
def test_bad_options_are_config_errors(key, value, pattern):
  c = config_lib.default_config()
  c.evals = {"fs": common.eval_entry(type="fewshot", source="shapes:classes")}
  c.evals.fs[key] = value
  with pytest.raises(errors.ConfigError, match=rf"config\.evals\.fs\.{pattern}"):
    validation.validate(c)
