"""Makes tests/fixtures/interop/resize_torch_bicubic.npz: position grids resized by
torch's F.interpolate(mode='bicubic', align_corners=False) without antialias, as HF
SigLIP's `interpolate_pos_encoding` does (tests/test_interop_export.py compares
`vlp_jax.interop.common.resize_grid(..., kind='torch_bicubic')` with it).

Needs torch (REF_PY: the reference environment, tests/fixtures/interop/README.md):

  REF_PY tools/make_resize_fixtures.py [--out=tests/fixtures/interop/resize_torch_bicubic.npz]
"""
import argparse

import numpy as np
import torch

# (grid side, (new_h, new_w)): up, down, non-square, a large upscale.
CASES = ((4, (6, 6)), (5, (3, 3)), (4, (7, 5)), (3, (8, 8)))
WIDTH = 3


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default="tests/fixtures/interop/resize_torch_bicubic.npz")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  arrays = {}
  for i, (g, (h, w)) in enumerate(CASES):
    pos = rng.normal(size=(g * g, WIDTH)).astype(np.float32)
    x = torch.from_numpy(pos).reshape(1, g, g, WIDTH).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic",
                                        align_corners=False)
    arrays[f"pos_{i}"] = pos
    arrays[f"size_{i}"] = np.array([h, w], np.int32)
    arrays[f"out_{i}"] = y.permute(0, 2, 3, 1).reshape(h * w, WIDTH).numpy()
  np.savez(args.out, **arrays)
  print("wrote", args.out, sorted(arrays))


if __name__ == "__main__":
  main()
