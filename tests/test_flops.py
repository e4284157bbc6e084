"""Analytic FLOP counts: the published ViT-B/16 CLIP figure and XLA's cost analysis."""
import jax
import pytest

from configs import clip_b16, coca_b16, siglip_b16
from tests import test_train
from vlp_jax import benchmark, flops


def test_clip_b16_matches_published_count():
  c = clip_b16.get_config()
  fwd = flops.forward_gflops_by_part(c)
  # open_clip's profile: 35.13 GFLOP image + 5.96 GFLOP text per forward sample.
  assert fwd["image"] + fwd["heads"] / 2 == pytest.approx(35.13, rel=0.005)
  assert fwd["text"] + fwd["heads"] / 2 == pytest.approx(5.96, rel=0.005)
  assert flops.train_flops_per_sample(c) / 1e9 == pytest.approx(123.0, rel=0.02)


def test_other_recipes_and_patch_dropout():
  # open_clip's profile: SigLIP-B/16 (MAP head) 46.44 GFLOP forward, but at 256 px
  # with a 64-token text tower; here only check the image tower grows with the MAP head.
  siglip = flops.forward_gflops_by_part(siglip_b16.get_config())
  clip = flops.forward_gflops_by_part(clip_b16.get_config())
  assert siglip["image"] > clip["image"] - 0.1
  coca = flops.forward_gflops_by_part(coca_b16.get_config())
  assert coca["decoder"] > 0
  c = clip_b16.get_config()
  c.model.image.patch_dropout = 0.5
  assert flops.image_tokens(c.model, 224) == 98
  assert flops.image_tokens(c.model, 224, train=False) == 196
  half = flops.forward_gflops_by_part(c, train=True)["image"]
  assert 0.45 < half / clip["image"] < 0.52  # attention is quadratic: a bit under half


def test_peak_table():
  assert flops.table_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.table_peak_flops("NVIDIA H200") == 989e12
  assert flops.table_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.table_peak_flops("TPU v4") == 275e12
  assert flops.table_peak_flops("TPU v5 lite") == 197e12
  assert flops.table_peak_flops("TPU v5p") == 459e12
  assert flops.table_peak_flops("TPU v6 lite") == 918e12
  assert flops.table_peak_flops("cpu") is None
  peak, source = flops.peak_flops("float32", jax.devices("cpu")[0])
  assert source.startswith("measured") and 1e8 < peak < 1e14


@pytest.mark.parametrize("name", ["two_tower", pytest.param("coca", marks=pytest.mark.slow)])
def test_analytic_count_matches_xla_cost_analysis(name):
  c = test_train.tiny_config()
  c.model.name = name
  c.objectives = {"clip": 1.0, "caption": 2.0} if name == "coca" else {"clip": 1.0}
  # Wide enough that matmuls dominate the elementwise ops XLA also counts.
  c.model.image.update(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8)
  c.model.text.update(width=128, depth=2, mlp_dim=512, num_heads=2)
  c.model.embed_dim = 128
  setup = benchmark.TrainSetup(c)
  mesh_ctx, rules_ctx = setup.contexts()
  with mesh_ctx, rules_ctx:
    state = setup.create_state()
    batch = benchmark.synthetic_batch(c)
    compiled = setup.step_fn.lower(state, batch).compile()
  xla = flops.xla_flops(compiled)
  analytic = flops.train_flops_per_sample(c) * c.batch_size
  assert xla is not None
  assert analytic == pytest.approx(xla, rel=0.10), (analytic, xla)
