"""k-means on 8 simulated devices equals k-means on one (and the NumPy reference)."""
import jax
import numpy as np

from tests import test_curation
from vlp_jax.curation import kmeans


def test_kmeans_on_8_devices_equals_one_device():
  assert jax.device_count() == 8
  x = test_curation.blobs(n=500, spread=2.5)
  c0 = kmeans.init_centroids(x, 6, seed=2)
  one = kmeans.lloyd(x, c0, iters=6, chunk_rows=128, devices=jax.devices()[:1])
  eight = kmeans.lloyd(x, c0, iters=6, chunk_rows=100)  # Rounded up to 8 x 13 rows.
  np.testing.assert_array_equal(eight.assignments, one.assignments)
  np.testing.assert_allclose(eight.centroids, one.centroids, rtol=1e-5, atol=1e-5)
  want_c, want_a = test_curation.numpy_lloyd(x, c0, 6)
  np.testing.assert_array_equal(eight.assignments, want_a)
  np.testing.assert_allclose(eight.centroids, want_c, rtol=1e-4, atol=1e-4)
  # k-means++ init runs sharded too, and equals its one-device run.
  pp8 = kmeans.init_centroids(x, 6, seed=2, init="kmeans++", chunk_rows=64)
  pp1 = kmeans.init_centroids(x, 6, seed=2, init="kmeans++", chunk_rows=64,
                              devices=jax.devices()[:1])
  np.testing.assert_array_equal(pp8, pp1)
