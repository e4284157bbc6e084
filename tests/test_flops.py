"""Analytic FLOP counts: the published ViT-B/16 CLIP figure and XLA's cost analysis."""
import jax
import pytest

from configs import clip_b16, coca_b16, siglip_b16
from tests import test_train
from vlp_jax.perf import benchmark, flops


def test_clip_b16_matches_published_count():
  c = clip_b16.get_config()
  fwd = flops.forward_gflops_by_part(c)
  # open_clip's profile: 35.13 GFLOP image + 5.96 GFLOP text per forward sample.
  assert fwd["image"] + fwd["heads"] / 2 == pytest.approx(35.13, rel=0.005)
  assert fwd["text"] + fwd["heads"] / 2 == pytest.approx(5.96, rel=0.005)
  assert flops.train_flops_per_sample(c) / 1e9 == pytest.approx(123.0, rel=0.02)


# Per-sample forward multiply-adds of the recipes (train=True) and their image / text
# tower train FLOPs, as counted before the families owned their counts: exact.
PINNED = {
    "clip_b16": ({"image": 17563060224, "text": 2979508224, "decoder": 0,
                  "heads": 655360, "logits": 16777216}, 105380720640, 17878622208),
    "siglip_b16": ({"image": 17708292096, "text": 2979508224, "decoder": 0,
                    "heads": 983040, "logits": 25165824}, 106253291520, 17879408640),
    "coca_b16": ({"image": 19627186176, "text": 2979508224, "decoder": 7264645120,
                  "heads": 655360, "logits": 33554432}, 106252111872, 17878622208),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_recipe_counts_are_pinned(name):
  c = {"clip_b16": clip_b16, "siglip_b16": siglip_b16,
       "coca_b16": coca_b16}[name].get_config()
  parts, image, text = PINNED[name]
  macs = flops.forward_macs(c)
  assert macs == parts and list(macs) == ["image", "text", "decoder", "heads", "logits"]
  assert flops.train_flops_per_sample(c) == 6.0 * sum(parts.values())
  assert flops.tower_train_flops_per_sample(c, "image") == image
  assert flops.tower_train_flops_per_sample(c, "text") == text


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
  assert_analytic_matches_xla(c)


def assert_analytic_matches_xla(c, rel=0.10):
  """The analytic train FLOPs of config `c` are within `rel` of XLA's cost analysis
  of its train step, lowered from abstract inputs: the HLO's count is within 1% of the
  compiled program's (checked by test_benchmark.py), without compiling the step or the
  state initialiser."""
  setup = benchmark.TrainSetup(c)
  mesh_ctx, rules_ctx = setup.contexts()
  with mesh_ctx, rules_ctx:
    state = setup.abstract  # Shapes, dtypes and shardings.
    batch = benchmark.synthetic_batch(c)
    lowered = setup.step_fn.lower(state, batch)
  xla = flops.xla_flops(lowered)
  analytic = flops.train_flops_per_sample(c) * c.batch_size
  assert xla is not None
  assert analytic == pytest.approx(xla, rel=rel), (analytic, xla)


def test_tower_counts_add_up_to_the_train_step():
  for name in ("two_tower", "coca"):
    c = clip_b16.get_config() if name == "two_tower" else coca_b16.get_config()
    both = (flops.tower_train_flops_per_sample(c, "image")
            + flops.tower_train_flops_per_sample(c, "text"))
    macs = flops.forward_macs(c)
    rest = macs["logits"] + macs["decoder"]
    if name == "coca":  # the caption pooler feeds only the decoder
      q, n, w = c.model.decoder.num_queries, 196, 768
      rest += flops.pool_macs(q, n, w, 3072) + q * w * c.model.text.width
    assert both + 6.0 * rest == pytest.approx(flops.train_flops_per_sample(c), rel=1e-9)
  c = clip_b16.get_config()
  full = flops.tower_train_flops_per_sample(c, "image")
  assert full / 1e9 == pytest.approx(3 * 35.13, rel=0.005)  # open_clip's image forward
  c.model.image.patch_dropout = 0.5
  # FLIP at 0.5: the image tower does a bit under half the work (98 of 196 patches).
  assert 0.45 < flops.tower_train_flops_per_sample(c, "image") / full < 0.52


@pytest.mark.slow  # ~25 s; the step benchmark is test_benchmark.py's.
def test_tower_benchmark_times_only_its_tower():
  c = test_train.tiny_config()
  c.model.image.update(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8)
  c.model.text.update(width=128, depth=2, mlp_dim=512, num_heads=2)
  c.model.embed_dim = 128
  bench = benchmark.TowerBenchmark(c, "image")
  times = bench.time(2)
  rec = bench.record(times)
  assert rec["measured"] == "image tower forward + backward"
  assert rec["model_gflops_per_sample"] * 1e9 == flops.tower_train_flops_per_sample(
      c, "image")
  # XLA's count of the compiled program agrees: no text-tower work was left in it.
  assert 0.9 < rec["xla_over_model_flops"] < 1.1, rec["xla_over_model_flops"]
  # It returns exactly the image tower's gradients, equal to a plain jax.grad.
  params = bench.state.params
  used = benchmark.used_leaves(lambda p: p["img"]["pos_embedding"].sum(), params)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  assert [p for p, u in zip(paths, used) if u] == ["['img']['pos_embedding']"]
  grads = bench.compiled(*bench.args)
  model = bench.setup.model

  def objective(p):
    emb, _ = model.apply({"params": p}, bench.args[1], train=True, method="embed_image",
                         rngs={"dropout": bench.args[2]})
    return (emb.astype("float32") ** 2).sum()
  # tiny_config is CoCa: its image embedding also reads the contrastive pooler.
  used = benchmark.used_leaves(objective, params)
  ref = jax.tree.leaves(jax.grad(objective)(params))
  assert len(grads) == sum(used) > 0
  kept = [r for r, u in zip(ref, used) if u]
  for g, r in zip(grads, kept):
    assert jax.numpy.allclose(g, r, rtol=1e-5, atol=1e-6)
  used_paths = {p for p, u in zip(paths, used) if u}
  assert any(p.startswith("['img']") for p in used_paths)
  assert not any(p.startswith("['txt']") or p.startswith("['decoder']") for p in used_paths)
  # What was dropped is exactly the zero gradients.
  assert all(not jax.numpy.any(r) for r, u in zip(ref, used) if not u)
