"""Makes the open_clip CoCa weight-interop parity fixtures (tests/test_interop_coca.py).

Needs the reference libraries, not vlp_jax's own environment: REF_PY is a Python with
`pip install torch==2.14.1 open_clip_torch==3.3.0 transformers==5.24.0 safetensors==0.8.0`
(see tools/make_interop_fixtures.py):

  REF_PY tools/make_coca_fixtures.py [--out=tests/fixtures/interop/coca]

Builds a tiny randomly initialised open_clip `CoCa` (ViT image tower with an
attentional pooler, `embed_cls` text tower, multimodal decoder), perturbs every
parameter (`make_interop_fixtures.perturb`: biases, LayerNorms and attention key
biases are non-zero), saves its state dict as open_clip saves it (`coca.safetensors`)
and as a plain `torch.save` archive (`coca.bin`, read by vlp_jax without torch), and
in `coca_ref.npz` the inputs (NCHW images, token ids with padding and an id 0 inside a
caption) and outputs: L2-normalised image/text embeddings, contrastive logits,
caption logits (`CoCa.forward`'s teacher-forced `logits`, [B, L - 1, V]) and the
decoder's image context (`image_embs`).

With `--check_export=OUT.safetensors` it loads a vlp_jax export (and the OUT.json
model config written beside it) into open_clip's `CoCa` (strict) and prints the max
abs differences of its outputs from `--ref` (default: the fixture's references).

With `--real=PATH [--model_name=coca_ViT-B-32]` it instead writes the same reference
file (to --out, a .npz path) for a real downloaded checkpoint, for the opt-in
real-checkpoint test (tests/test_interop_coca.py, VLP_COCA_CHECKPOINT /
VLP_COCA_REFERENCE).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_interop_fixtures import (  # pylint: disable=wrong-import-position
    images, perturb, tokens, write_readme)

VOCAB, CONTEXT = 64, 16
IMAGE, PATCH = 16, 4
# Distinct widths and head counts, so that no size is mistaken for another: the image
# width (24) differs from embed_dim (12), so the pooler's attention has separate
# q/k/v weights, as in the released models; the pooler has 4 heads, the ViT 3. The
# text MLP is 4x wide, as open_clip's decoder always is.
VISION = dict(image_size=IMAGE, layers=2, width=24, head_width=8, mlp_ratio=1.0,
              patch_size=PATCH, attentional_pool=True, attn_pooler_heads=4,
              attn_pooler_queries=5, output_tokens=True)
TEXT = dict(context_length=CONTEXT, vocab_size=VOCAB, width=12, heads=2, layers=2,
            mlp_ratio=4.0, embed_cls=True, output_tokens=True)
MULTIMODAL = dict(context_length=CONTEXT, vocab_size=VOCAB, width=12, heads=2, layers=2)
EMBED_DIM = 12


def coca_model(seed=0):
  from open_clip import coca_model as oc_coca  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  m = oc_coca.CoCa(embed_dim=EMBED_DIM, multimodal_cfg=MULTIMODAL, text_cfg=TEXT,
                   vision_cfg=VISION).eval()
  with torch.no_grad():  # open_clip leaves it uninitialised (torch.empty).
    torch.nn.init.normal_(m.text_decoder.text_projection, std=MULTIMODAL["width"] ** -0.5)
  perturb(m, seed)
  for name, p in m.state_dict().items():
    assert torch.isfinite(p).all(), name
  return m


def references(m, imgs, toks):
  """Reference outputs of CoCa `m` on NCHW `imgs` and token ids `toks`."""
  with torch.no_grad():
    x, t = torch.from_numpy(imgs), torch.from_numpy(toks)
    out = m(x, t)  # teacher forcing: logits of text[:, :-1] predicting text[:, 1:]
    _, context = m._encode_image(x)  # pylint: disable=protected-access
    ie, te = out["image_features"].numpy(), out["text_features"].numpy()
    scale = m.logit_scale.exp().item()
  for name, value in (("image", ie), ("text", te), ("caption", out["logits"])):
    assert np.isfinite(np.asarray(value)).all(), f"non-finite {name} outputs"
  return dict(images=imgs, tokens=toks, image_emb=ie, text_emb=te,
              logits=(scale * ie @ te.T).astype(np.float32),
              caption_logits=out["logits"].numpy(), context=context.numpy())


def make(out):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  m = coca_model()
  sd = {k: v.contiguous() for k, v in m.state_dict().items()}
  save_file(sd, os.path.join(out, "coca.safetensors"))
  torch.save(sd, os.path.join(out, "coca.bin"))
  np.savez(os.path.join(out, "coca_ref.npz"),
           **references(m, images(IMAGE), tokens(VOCAB, CONTEXT)))
  with open(os.path.join(out, "coca_config.json"), "w") as f:
    json.dump(dict(embed_dim=EMBED_DIM, vision_cfg=VISION, text_cfg=TEXT,
                   multimodal_cfg=MULTIMODAL), f, indent=2)


def make_real(args):
  """Reference outputs of a real open_clip CoCa checkpoint (random inputs)."""
  import open_clip  # pylint: disable=import-outside-toplevel
  m = open_clip.create_model(args.model_name, pretrained=args.real).eval()
  size = m.visual.image_size[0]
  toks = tokens(m.text.vocab_size, m.context_length)
  np.savez(args.out, **references(m, images(size), toks))
  print("wrote", args.out)


def check_export(args):
  """Loads vlp_jax's export (PATH.safetensors + PATH.json) into open_clip's CoCa and
  prints its outputs' max abs difference from `--ref` (e.g. the fixture's)."""
  from open_clip import coca_model as oc_coca  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  with open(args.check_export[:-len(".safetensors")] + ".json") as f:
    cfg = json.load(f)
  cfg.pop("custom_text", None)
  m = oc_coca.CoCa(**cfg).eval()
  m.load_state_dict(load_file(args.check_export), strict=True)
  ref = np.load(args.ref)
  got = references(m, ref["images"], ref["tokens"])
  diffs = {k: float(np.abs(got[k] - ref[k]).max())
           for k in ("image_emb", "text_emb", "logits", "caption_logits", "context")}
  print(json.dumps(diffs))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures/interop/coca")
  ap.add_argument("--real", default="", help="a real open_clip CoCa checkpoint file")
  ap.add_argument("--model_name", default="coca_ViT-B-32", help="open_clip model name")
  ap.add_argument("--check_export", default="",
                  help="a vlp_jax export (.safetensors, with its .json) to load in open_clip")
  ap.add_argument("--ref", default="tests/fixtures/interop/coca/coca_ref.npz",
                  help="reference outputs for --check_export")
  args = ap.parse_args()
  torch.set_num_threads(1)
  if args.check_export:
    check_export(args)
    return
  if args.real:
    make_real(args)
    return
  os.makedirs(args.out, exist_ok=True)
  make(args.out)
  write_readme(args.out, "make_coca_fixtures.py", "a tiny random open_clip CoCa")


if __name__ == "__main__":
  main()
