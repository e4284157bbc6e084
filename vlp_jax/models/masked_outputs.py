"""Masked-image outputs (TIPS / SigLIP 2 masked prediction), shared by the two-tower
and CoCa families.

With `config.model.masked_image_ratio` r > 0, a training forward pass (train=True)
also runs the image tower on `batch['image']` with k = round(r N) of its N embedded
patches per example replaced by the tower's learned mask token (`vit.ViT`'s `mask`;
the positions are added after the replacement, as iBOT / DINOv2 / TIPS do), and
returns

    masked_image_tokens  [B, N, W]  the tower's tokens of the masked image
    image_patch_mask     [B, N]     float32, 1 = that patch was masked

The mask is a uniformly random subset of exactly k patches per example, drawn from
the 'dropout' rng stream (as patch dropout is); patch dropout is off in this pass (the
tokens must line up with the teacher's). Evaluation and the momentum teacher's pass
(train=False) return neither output. The first forward pass at initialisation runs the
masked path too, so the parameter `img/mask_token` exists from the start.
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from vlp_jax.models import builders

OUTPUTS = ("masked_image_tokens", "image_patch_mask")
SWITCH = "config.model.masked_image_ratio=0.5"


def ratio(model_cfg) -> float:
  """`config.model.masked_image_ratio` (0.0 when absent: off)."""
  return float(model_cfg.get("masked_image_ratio", 0.0) or 0.0)


def output_names(model_cfg) -> frozenset:
  """The masked outputs a family returns under `model_cfg` (empty when off)."""
  return frozenset(OUTPUTS) if ratio(model_cfg) > 0 else frozenset()


def num_masked(n: int, mask_ratio: float) -> int:
  """How many of `n` patches are masked per example: round(n r), within [1, n - 1]."""
  return min(max(1, int(round(n * mask_ratio))), n - 1) if n > 1 else 0


def random_patch_mask(rng, batch: int, n: int, mask_ratio: float):
  """[batch, n] bool: exactly `num_masked(n, mask_ratio)` True per row, a uniformly
  random subset (the ranks of uniform noise)."""
  noise = jax.random.uniform(rng, (batch, n))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return ranks < num_masked(n, mask_ratio)


def add_masked_outputs(out: Dict, module, images, encode: Callable,
                       train: bool) -> Dict:
  """Adds the masked outputs to `out` (in place; returned) when the model config of
  `module` (a family: `module.config`) turns them on, `train` is set (or the module is
  initialising) and `images` is not None.

  `encode(images, mask)` -> the image tower's patch tokens [B, N, W] with `mask`
  ([B, N] bool) applied, e.g. `lambda x, m: self.img(x, train=train, mask=m)[1]`.
  """
  r = ratio(module.config)
  if r <= 0 or images is None or not (train or module.is_initializing()):
    return out
  b, h, w = images.shape[:3]
  p = builders.tower_kwargs(module.config.image, None)["patch_size"]
  mask = random_patch_mask(module.make_rng("dropout"), b, (h // p) * (w // p), r)
  out["masked_image_tokens"] = encode(images, mask)
  out["image_patch_mask"] = mask.astype(jnp.float32)
  return out
