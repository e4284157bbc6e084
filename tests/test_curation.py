"""Curation: k-means against NumPy, the filters and balanced selection on constructed
embeddings, and tools/curate.py end to end on a tiny trained run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import test_train
from vlp_jax import config as config_lib, errors
from vlp_jax.curation import curate, filters, kmeans, rules, select
from vlp_jax.data import sources

# The tiny run's set-up is shared with the other modules training test_train's config.
pytestmark = pytest.mark.usefixtures("shared_compilations")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_lloyd(x, centroids, iters):
  """Plain NumPy Lloyd's algorithm (float64): (centroids, assignments)."""
  x = np.asarray(x, np.float64)
  c = np.asarray(centroids, np.float64).copy()

  def assign(c):
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
  for _ in range(iters):
    a = assign(c)
    for j in range(len(c)):
      if (a == j).any():
        c[j] = x[a == j].mean(0)
  return c, assign(c)


def blobs(n=600, k=6, d=8, seed=0, spread=1.0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, d)) * 4
  return (centres[rng.integers(k, size=n)] + spread * rng.normal(size=(n, d))).astype(
      np.float32)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_equals_numpy_lloyd_from_the_same_init(init):
  x = blobs(spread=2.5)  # Overlapping blobs: the iterations move many rows.
  c0 = kmeans.init_centroids(x, 6, seed=3, init=init)
  got = kmeans.lloyd(x, c0, iters=8, chunk_rows=128)  # 5 chunks, the last padded.
  want_c, want_a = numpy_lloyd(x, c0, 8)
  np.testing.assert_array_equal(got.assignments, want_a)
  np.testing.assert_allclose(got.centroids, want_c, rtol=1e-4, atol=1e-4)
  assert np.all(np.diff(got.inertia) <= 1e-3 * got.inertia[0])  # Never increases.
  # The chunk size does not matter, and kmeans() = init + lloyd.
  one = kmeans.kmeans(x, 6, iters=8, seed=3, init=init, chunk_rows=4096)
  np.testing.assert_array_equal(one.assignments, got.assignments)


def test_kmeans_init_and_errors():
  x = blobs(n=50)
  c = kmeans.init_centroids(x, 5, seed=0)
  assert c.shape == (5, 8) and len({tuple(r) for r in c}) == 5
  assert all(any(np.array_equal(r, row) for row in x) for r in c)  # Rows of x.
  np.testing.assert_array_equal(c, kmeans.init_centroids(x, 5, seed=0))
  assert not np.array_equal(c, kmeans.init_centroids(x, 5, seed=1))
  with pytest.raises(errors.ConfigError, match="1 <= k <= the 50 rows"):
    kmeans.kmeans(x, 51)
  with pytest.raises(errors.ConfigError, match="Unknown k-means init"):
    kmeans.kmeans(x, 2, init="best")


def test_an_empty_cluster_keeps_its_centroid():
  x = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], np.float32)
  c0 = np.array([[0, 0.5], [10, 10.5], [100, 100]], np.float32)
  got = kmeans.lloyd(x, c0, iters=3)
  np.testing.assert_allclose(got.centroids[2], [100, 100])
  np.testing.assert_array_equal(got.assignments, [0, 0, 1, 1])


# ----------------------------------------------------------------------- filters


def test_similarity_filter_fraction_and_threshold():
  scores = np.array([0.1, 0.9, 0.5, 0.5, 0.3, 0.8, -0.2, 0.7])
  everyone = np.ones(8, bool)
  np.testing.assert_array_equal(np.nonzero(filters.similarity_filter(
      scores, everyone, keep_fraction=0.5))[0], [1, 2, 5, 7])
  # Ties: the earlier record ranks higher.
  np.testing.assert_array_equal(np.nonzero(filters.similarity_filter(
      scores, everyone, keep_fraction=5 / 8))[0], [1, 2, 3, 5, 7])
  np.testing.assert_array_equal(np.nonzero(filters.similarity_filter(
      scores, everyone, min_similarity=0.5))[0], [1, 2, 3, 5, 7])
  both = filters.similarity_filter(scores, everyone, keep_fraction=0.75,
                                   min_similarity=0.6)
  np.testing.assert_array_equal(np.nonzero(both)[0], [1, 5, 7])
  # Only candidates survive, and the fraction is of all records.
  cand = everyone.copy()
  cand[1] = False
  np.testing.assert_array_equal(np.nonzero(filters.similarity_filter(
      scores, cand, keep_fraction=0.25))[0], [5, 7])


def _greedy_reference(emb, thr, prio):
  emb = filters.normalize(emb)
  kept = []
  for i in filters.rank_order(prio):
    if all(emb[i] @ emb[j] < thr - filters.TOLERANCE for j in kept):
      kept.append(i)
  return sorted(kept)


def test_near_duplicates_keep_the_best_of_each_group():
  rng = np.random.default_rng(0)
  base = filters.normalize(rng.normal(size=(30, 16)))  # Distinct (cosine << 0.95).
  # Records 30..39 are near-copies of records 0..9; copies of 0..4 score higher.
  copies = base[:10] + 0.01 * rng.normal(size=(10, 16))
  emb = np.concatenate([base, copies]).astype(np.float32)
  scores = np.zeros(40)
  scores[30:35] = 1.0
  keep = filters.near_duplicates(emb, 0.95, np.ones(40, bool), priority=scores, block=7)
  want = sorted(set(range(40)) - set(range(0, 5)) - set(range(35, 40)))
  np.testing.assert_array_equal(np.nonzero(keep)[0], want)
  # Block size does not matter; equals the plain greedy loop; candidates only.
  for block in (1, 3, 64):
    np.testing.assert_array_equal(
        filters.near_duplicates(emb, 0.95, np.ones(40, bool), scores, block), keep)
  np.testing.assert_array_equal(np.nonzero(keep)[0], _greedy_reference(emb, 0.95, scores))
  cand = np.ones(40, bool)
  cand[30:35] = False  # The better copies are gone: the originals stay.
  kept = filters.near_duplicates(emb, 0.95, cand, scores, block=8)
  assert kept[:5].all() and not kept[30:35].any() and not kept[35:].any()
  with pytest.raises(errors.ConfigError, match="cosine similarity in"):
    filters.near_duplicates(emb, 0.0, cand)


def test_threshold_one_removes_exact_duplicates():
  rng = np.random.default_rng(2)
  base = rng.normal(size=(50, 32)).astype(np.float32) * 3.7  # Not unit: rounding.
  emb = np.concatenate([base, base[::-1], 2.0 * base[:5]])  # Exact / scaled copies.
  keep = filters.near_duplicates(emb, 1.0, np.ones(len(emb), bool), block=16)
  np.testing.assert_array_equal(np.nonzero(keep)[0], np.arange(50))


def test_near_duplicates_of_random_data_match_the_greedy_reference():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(120, 4)).astype(np.float32)  # Low dim: many close pairs.
  prio = rng.normal(size=120)
  got = filters.near_duplicates(emb, 0.9, np.ones(120, bool), prio, block=16)
  assert 10 < got.sum() < 110
  np.testing.assert_array_equal(np.nonzero(got)[0], _greedy_reference(emb, 0.9, prio))


# --------------------------------------------------------------------- balancing


def test_balanced_quotas():
  np.testing.assert_array_equal(select.balanced_quotas(np.array([1, 5, 10, 100]), 40),
                                [1, 5, 10, 24])
  np.testing.assert_array_equal(select.balanced_quotas(np.array([10, 10, 10]), 7),
                                [3, 2, 2])
  np.testing.assert_array_equal(select.balanced_quotas(np.array([2, 3]), 10), [2, 3])


def test_balanced_select_per_cluster_counts_and_rules():
  # Clusters of sizes 40, 20, 4: 24 records -> 10, 10, 4.
  assign = np.repeat([0, 1, 2], [40, 20, 4])
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(assign))
  assign = assign[perm]
  scores = rng.normal(size=len(assign))
  cand = np.ones(len(assign), bool)
  for rule in select.RULES:
    keep = select.balanced_select(assign, scores, cand, 24, rule)
    np.testing.assert_array_equal(np.bincount(assign[keep], minlength=3), [10, 10, 4])
  keep = select.balanced_select(assign, scores, cand, 24, "score")
  for c in range(3):
    members = np.nonzero(assign == c)[0]
    top = members[np.argsort(-scores[members])[:keep[members].sum()]]
    assert set(top) == set(np.nonzero(keep & (assign == c))[0])
  strided = select.balanced_select(assign, scores, cand, 24, "strided")
  members = np.nonzero(assign == 0)[0]
  np.testing.assert_array_equal(np.nonzero(strided & (assign == 0))[0], members[::4])
  with pytest.raises(errors.ConfigError, match="within-cluster rule"):
    select.balanced_select(assign, scores, cand, 24, "nearest")
  # 'proportional': the same share of each cluster (TL;DR's every N-th member).
  keep = select.balanced_select(assign, scores, cand, 16, "strided", "proportional")
  np.testing.assert_array_equal(np.bincount(assign[keep], minlength=3), [10, 5, 1])
  np.testing.assert_array_equal(np.nonzero(keep & (assign == 0))[0], members[::4])


def test_proportional_quotas():
  np.testing.assert_array_equal(select.proportional_quotas(np.array([40, 20, 4]), 32),
                                [20, 10, 2])
  got = select.proportional_quotas(np.array([7, 7, 7]), 10)
  np.testing.assert_array_equal(got, [4, 3, 3])  # Sum exact; ties to the earlier.
  np.testing.assert_array_equal(select.proportional_quotas(np.array([2, 3]), 10), [2, 3])
  np.testing.assert_array_equal(select.proportional_quotas(np.array([0, 0]), 5), [0, 0])


def test_rules_apply_in_order_with_counts():
  x = blobs(n=200, k=4, d=8)
  scores = np.linspace(1, 0, 200)
  readable = np.ones(200, bool)
  readable[7] = False
  o = rules.Options(keep_fraction=0.8, dedup_threshold=0.9999, clusters=4,
                    balance_fraction=0.4, kmeans_iters=5)
  res = rules.apply(x, scores, readable, o)
  assert [c["rule"] for c in res.counts] == ["readable", "similarity", "dedup", "balance"]
  assert res.counts[0]["out"] == 199 and res.counts[1]["out"] == 160
  assert res.keep.sum() == 80 == res.counts[-1]["out"]
  assert res.dropped_by[7] == "readable" and res.dropped_by[199] == "similarity"
  assert set(res.dropped_by[res.keep]) == {""}
  with pytest.raises(errors.ConfigError, match="needs both clusters"):
    rules.check(rules.Options(clusters=4))


@pytest.mark.parametrize("options, match", [
    (dict(keep_fraction=1.5), "keep_fraction must be in"),
    (dict(keep_fraction=-0.1), "keep_fraction must be in"),
    (dict(min_similarity=2.0), "min_similarity is a cosine"),
    (dict(dedup_threshold=1.2), "dedup_threshold .* must be in"),
    (dict(dedup_threshold=-0.5), "dedup_threshold .* must be in"),
    (dict(clusters=4, balance_fraction=0.5, kmeans_iters=0), "kmeans_iters must be"),
    (dict(clusters=4, balance_fraction=0.5, kmeans_init="far"), "Unknown kmeans_init"),
    (dict(clusters=4, balance_fraction=0.5, quota="most"), "Unknown quota"),
    (dict(clusters=300, balance_fraction=0.5), "clusters=300 exceeds the 200 records"),
    (dict(balance_fraction=1.5, clusters=4), "balance_fraction must be in"),
])
def test_rules_check_every_option_before_any_work(options, match):
  with pytest.raises(errors.ConfigError, match=match):
    rules.check(rules.Options(**options), records=200)


# ----------------------------------------------------------------- curate tool


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """test_train's tiny run on shapes, 2 steps (one checkpoint: the scores need not be
  meaningful)."""
  from vlp_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("curate_run"))
  c = test_train.tiny_config(total_steps=2)
  c.checkpoint_every = 2
  loop.run(c, workdir)
  return workdir


def test_curate_writes_index_and_report_on_a_noisy_source(trained, tmp_path):
  out = str(tmp_path / "cur")
  o = rules.Options(keep_fraction=0.75, dedup_threshold=0.99999, clusters=3,
                    balance_fraction=0.5, within_cluster="strided", kmeans_iters=3)
  summary = curate.run(trained, out, o, "shapes:noisy=0.25", size=48, batch_size=16,
                       shards=2)
  assert summary["total"] == 48 and summary["kept"] == 24
  header = json.load(open(os.path.join(out, "index.json")))
  assert header["source"] == "shapes:noisy=0.25" and header["count"] == 24
  assert header["source_size"] == 48 and header["split"] == "train"
  assert [r["rule"] for r in header["rules"]] == ["readable", "similarity", "dedup",
                                                    "balance"]
  report = json.load(open(os.path.join(out, "report", "counts.json")))
  c = report["corruption"]
  assert c["corrupted"] == 12 and c["removed"] == 24
  assert 0 <= c["removed_corrupted"] <= 12 and c["recall"] == c["removed_corrupted"] / 12
  for name in ("counts.md", "scores.png", "examples.png"):
    assert os.path.getsize(os.path.join(out, "report", name)) > 100
  scores = np.load(os.path.join(out, "scores.npz"))
  assert np.isfinite(scores["score"]).all() and scores["keep"].sum() == 24
  # The index source reads the kept records; so do the shards.
  src = sources.make_source("index:" + summary["index"], "train", 0, 0, 32)
  base = sources.make_source("shapes:noisy=0.25", "train", 48, 0, 32)
  kept = np.nonzero(scores["keep"])[0]
  assert [src[i]["key"] for i in range(len(src))] == [base[j]["key"] for j in kept]
  shards = sources.make_source("arrayrecord:" + summary["shards"], "train", 0, 0, 32)
  assert len(shards) == 24
  assert sorted(shards[i]["key"] for i in range(24)) == sorted(base[j]["key"] for j in kept)


def test_curate_errors(trained, tmp_path):
  o = rules.Options(keep_fraction=0.01)  # round(0.01 * 16) = 0 records.
  with pytest.raises(errors.DataError, match="No record of 'shapes'"):
    curate.run(trained, str(tmp_path / "a"), o, "shapes", size=16, batch_size=16)
  with pytest.raises(errors.ConfigError, match="clusters=20 exceeds the 16 records"):
    curate.run(trained, str(tmp_path / "a"), rules.Options(clusters=20,
                                                          balance_fraction=0.5),
               "shapes", size=16, batch_size=16)
  os.makedirs(tmp_path / "done")
  open(tmp_path / "done" / "index.json", "w").close()
  with pytest.raises(errors.ConfigError, match="exists .*--overwrite"):
    curate.run(trained, str(tmp_path / "done"), o)
  with pytest.raises(errors.WorkdirError, match="Workdir not found"):
    curate.run(str(tmp_path / "none"), str(tmp_path / "b"), o)
  os.makedirs(tmp_path / "nockpt")
  with open(tmp_path / "nockpt" / "config.json", "w") as f:
    json.dump(config_lib.to_dict(test_train.tiny_config()), f)
  with pytest.raises(errors.WorkdirError, match="No checkpoints to evaluate"):
    curate.run(str(tmp_path / "nockpt"), str(tmp_path / "b"), o)
  from tests import test_m3ae  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "m3ae")
  with open(tmp_path / "m3ae" / "config.json", "w") as f:
    json.dump(config_lib.to_dict(test_m3ae.tiny_config()), f)
  with pytest.raises(errors.ConfigError, match="no image and text embeddings"):
    curate.run(str(tmp_path / "m3ae"), str(tmp_path / "b"), o)


@pytest.mark.slow  # ~6 s: a fresh interpreter importing JAX.
def test_curate_tool_reports_a_missing_workdir_without_a_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "curate.py"),
       f"--workdir={tmp_path}/none", f"--out={tmp_path}/out", "--keep_fraction=0.5"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "error: Workdir not found" in proc.stderr and "Traceback" not in proc.stderr


def test_experiment_commands(capsys, tmp_path):
  from experiments import curation as exp  # pylint: disable=g-import-not-at-top
  exp.main([f"--workdir={tmp_path}", "--seeds=3", "--arms=noisy,curated,random",
            "--dry_run", "--", "--config.total_steps=20"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4  # noisy run, curation, curated run, random-half run.
  assert "--config.data.source=shapes:hard+noisy=0.3" in lines[0]
  assert "--config.seed=3" in lines[0] and lines[0].endswith("--config.total_steps=20")
  assert "tools/curate.py" in lines[1] and f"--workdir={tmp_path}/noisy/seed3" in lines[1]
  assert f"index:{tmp_path}/index/curated/seed3/index.json" in lines[2]
  assert f"index:{tmp_path}/index/random/seed3/index.json" in lines[3]
  with pytest.raises(SystemExit):
    exp.main([f"--workdir={tmp_path}", "--arms=curated"])
