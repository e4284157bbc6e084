"""FLOPs that views, the momentum teacher and masked passes add to a step: the
analytic count against XLA's cost analysis of the compiled step, and by hand."""
import jax.numpy as jnp
import pytest

from tests import test_flops, test_train
from vlp_jax import models
from vlp_jax.perf import flops, method_flops
from vlp_jax.registry import OBJECTIVES


@OBJECTIVES.register("view_probe", replace=True, batch_global=True, reads=(
    "image_emb", "view_emb/local", "teacher_view_emb/aug", "text_view_emb/short"))
def view_probe(outputs, batch, cfg):
  """Test-only: ties the local views, the teacher's view and a text view to the loss."""
  del batch, cfg
  g = outputs["teacher_view_emb/aug"][:, 0]
  loss = (jnp.mean(jnp.sum(outputs["view_emb/local"] * g[:, None], -1))
          + jnp.mean(jnp.sum(outputs["text_view_emb/short"] * outputs["image_emb"], -1)))
  return loss, {"loss": loss}


def views_config():
  c = test_train.tiny_config()
  c.model.name = "two_tower"
  c.model.image.update(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8)
  c.model.text.update(width=128, depth=2, mlp_dim=512, num_heads=2)
  c.model.embed_dim = 128
  c.objectives = {"clip": 1.0, "view_probe": 1.0}
  c.teacher.params = [".*"]
  c.data.views = {"local": {"count": 2, "size": 16}, "aug": {"count": 1}}
  c.data.text_views = {"short": {"kind": "first_words", "words": 3}}
  return c


def test_extra_macs_by_hand():
  c = views_config()
  extra = method_flops.extra_train_macs(c)
  local = c.copy_and_resolve_references()
  local.data.image_size = 16
  img16 = models.tower_macs(local, "image", True)
  img32 = models.tower_macs(c, "image", False)
  txt = models.tower_macs(c, "text", True)
  assert extra["views"] == 3 * 2 * img16 + 3 * txt
  assert extra["teacher"] == img32  # Only the teacher reads the 'aug' view.
  assert extra["masked"] == 0
  plain = test_train.tiny_config()
  assert method_flops.extra_train_macs(plain) == {"views": 0, "teacher": 0, "masked": 0}
  # A view nobody reads costs nothing (XLA drops it).
  c.objectives = {"clip": 1.0}
  assert sum(method_flops.extra_train_macs(c).values()) == 0


def test_views_and_teacher_count_matches_xla():
  c = views_config()
  test_flops.assert_analytic_matches_xla(c)
  assert flops.train_flops_per_sample(c) > 1.3 * flops.train_flops_per_sample(
      test_train.tiny_config())


@pytest.mark.parametrize("name", ["tcl_b16", "pyramidclip_b16", "siglip2_b16",
                                  "m3ae_b16"])
def test_recipes_count_their_extra_work(name):
  from vlp_jax import cli  # pylint: disable=g-import-not-at-top
  c = cli.load_config_file(f"configs/{name}.py")
  extra = method_flops.extra_train_macs(c)
  base = 3 * sum(flops.forward_macs(c, train=True).values())
  total = flops.train_flops_per_sample(c)
  assert total == pytest.approx(2.0 * (base + sum(extra.values())), rel=1e-12)
  if name == "tcl_b16":  # Teacher over the momentum view and the text, no student view.
    assert extra["views"] == 0 and extra["teacher"] > 0
  if name == "pyramidclip_b16":
    assert extra["views"] > 0 and extra["teacher"] == 0
  if name == "siglip2_b16":
    assert extra["views"] > 0 and extra["teacher"] > 0 and extra["masked"] > 0
    # Its self-supervised objectives start at 80%: no extra work is done before.
    start = int(0.8 * c.total_steps)
    assert method_flops.extra_train_macs(c, start - 1) == {
        "views": 0, "teacher": 0, "masked": 0}
    assert method_flops.extra_train_macs(c, start) == extra
  if name == "m3ae_b16":
    assert sum(extra.values()) == 0
