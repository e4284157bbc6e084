"""Makes the CLIP-family weight-interop parity fixtures (tests/test_interop_clip.py).

Needs the reference libraries, not vlp_jax's own environment: REF_PY is a Python with
(CPU torch is enough)

  pip install torch==2.14.1 open_clip_torch==3.3.0 transformers==5.24.0 safetensors==0.8.0

  REF_PY tools/make_interop_fixtures.py [--out=tests/fixtures/interop/clip]

For each format it builds a tiny randomly initialised model in the original library,
perturbs every parameter (so biases, LayerNorm params and attention key biases are
non-zero), saves the weights as the library saves them and, in `<name>_ref.npz`, the
reference inputs (NCHW images as the model sees them, token ids) and outputs
(L2-normalised image/text embeddings, logits = scale * image_emb @ text_emb.T).

With `--real=PATH --format=open_clip|openai|hf_clip [--model_name=ViT-B-32]` it instead
writes the same reference file for a real checkpoint you downloaded (README "Pretrained
weights in and out"), for tests/test_interop_clip.py-style comparison.
"""
import argparse
import json
import os

import numpy as np
import torch

# The reference environment the fixtures were made with (REF_PY).
REF_PIP = "pip install torch==2.14.1 open_clip_torch==3.3.0 transformers==5.24.0 safetensors==0.8.0"
B = 3  # Examples in the reference batch.
VOCAB, CONTEXT = 64, 16
IMAGE, PATCH = 16, 4


def perturb(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("logit_scale"):
        continue
      p.add_(0.1 * torch.randn(p.shape, generator=g))


def tokens(vocab=VOCAB, context=CONTEXT, seed=0):
  """BOS words EOT then 0-padding; EOT = vocab-1 is the highest id (CLIP's layout).
  Row 1 contains the id 0 ('!' in CLIP's vocabulary) inside the caption."""
  rng = np.random.default_rng(seed)
  out = np.zeros((B, context), np.int64)
  for i, n in enumerate([5, 9, context - 2]):
    out[i, 0] = vocab - 2
    out[i, 1:n + 1] = rng.integers(1, vocab - 2, n)
    out[i, n + 1] = vocab - 1
  out[1, 3] = 0
  return out


def images(size=IMAGE, seed=1):
  return np.random.default_rng(seed).normal(size=(B, 3, size, size)).astype(np.float32)


def save_ref(path, imgs, toks, img_emb, txt_emb, scale, extra=None):
  img_emb, txt_emb = img_emb.detach().numpy(), txt_emb.detach().numpy()
  logits = float(scale) * img_emb @ txt_emb.T
  np.savez(path, images=imgs, tokens=toks, image_emb=img_emb, text_emb=txt_emb,
           logits=logits.astype(np.float32), **(extra or {}))


def write_readme(out, script, models):
  """Says in `out`/README.md which script made the fixtures (of `models`); prints the
  folder's files."""
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(f"Made by `REF_PY tools/{script}` ({models}; see that script). REF_PY: "
            f"a Python with `{REF_PIP}` (CPU torch is enough).\n")
  print(json.dumps(sorted(os.listdir(out))))


def open_clip_model(quick_gelu, seed):
  import open_clip  # pylint: disable=import-outside-toplevel
  from open_clip import model as oc_model  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  vision = oc_model.CLIPVisionCfg(layers=2, width=16, head_width=8, mlp_ratio=2.0,
                                  patch_size=PATCH, image_size=IMAGE)
  text = oc_model.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=24, heads=2,
                              layers=2, mlp_ratio=2.0)
  m = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text,
                     quick_gelu=quick_gelu).eval()
  perturb(m, seed)
  return m


def open_clip_refs(m, imgs, toks):
  with torch.no_grad():
    ie = m.encode_image(torch.from_numpy(imgs), normalize=True)
    te = m.encode_text(torch.from_numpy(toks), normalize=True)
  return ie, te, m.logit_scale.exp().item()


def make_open_clip(out):
  """open_clip layout, exact GELU (open_clip's default) as safetensors; a torch .bin
  of a few of its tensors stored as torch stores them: a transposed (strided) view,
  float16 and bfloat16 (read without torch by the tests)."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from open_clip import model as oc_model  # pylint: disable=import-outside-toplevel
  m = open_clip_model(quick_gelu=False, seed=0)
  sd = {k: v.contiguous() for k, v in m.state_dict().items()}
  save_file(sd, os.path.join(out, "open_clip.safetensors"))
  proj = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  torch.save({"strided_t": sd[proj].t(), "half": sd["visual.proj"].half(),
              "bf16": sd["visual.proj"].to(torch.bfloat16),
              "scalar": sd["logit_scale"], "text_projection": sd["text_projection"]},
             os.path.join(out, "torch_layouts.bin"))
  imgs, toks = images(), tokens()
  ie, te, scale = open_clip_refs(m, imgs, toks)
  # open_clip's own position-embedding resize to a 6x6 and a 2x2 grid.
  extra = {}
  for size in (IMAGE * 3 // 2, IMAGE // 2):
    sd2 = {"visual.positional_embedding": sd["visual.positional_embedding"].clone()}
    m2 = open_clip_model(quick_gelu=False, seed=0)
    m2.visual.grid_size = (size // PATCH, size // PATCH)
    m2.visual.positional_embedding = torch.nn.Parameter(
        torch.zeros((size // PATCH) ** 2 + 1, 16))
    oc_model.resize_pos_embed(sd2, m2)
    extra[f"pos_embed_{size}"] = sd2["visual.positional_embedding"].numpy()
  save_ref(os.path.join(out, "open_clip_ref.npz"), imgs, toks, ie, te, scale, extra)


def make_openai(out):
  """OpenAI layout (QuickGELU; the same keys as OpenAI's jit-free state dicts)."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  m = open_clip_model(quick_gelu=True, seed=1)
  sd = {k: v.contiguous() for k, v in m.state_dict().items()}
  save_file(sd, os.path.join(out, "openai.safetensors"))
  imgs, toks = images(seed=2), tokens(seed=3)
  save_ref(os.path.join(out, "openai_ref.npz"), imgs, toks, *open_clip_refs(m, imgs, toks))


def make_hf_clip(out):
  """Hugging Face CLIPModel: model.safetensors + config.json in hf_clip/."""
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(2)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=40,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
                       bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0),
      vision_config=dict(hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                         hidden_act="quick_gelu"),
      projection_dim=24)
  m = transformers.CLIPModel(cfg).eval()
  perturb(m, 2)
  d = os.path.join(out, "hf_clip")
  m.save_pretrained(d, safe_serialization=True)
  imgs, toks = images(seed=4), tokens(seed=5)
  with torch.no_grad():
    o = m(input_ids=torch.from_numpy(toks), pixel_values=torch.from_numpy(imgs))
  save_ref(os.path.join(out, "hf_clip_ref.npz"), imgs, toks, o.image_embeds,
           o.text_embeds, m.logit_scale.exp().item())


def make_real(args):
  """Reference outputs of a real checkpoint (random inputs of its size)."""
  import open_clip  # pylint: disable=import-outside-toplevel
  if args.format == "hf_clip":
    import transformers  # pylint: disable=import-outside-toplevel
    path = args.real if os.path.isdir(args.real) else os.path.dirname(args.real)
    m = transformers.CLIPModel.from_pretrained(path).eval()
    size, ctx = m.config.vision_config.image_size, m.config.text_config.max_position_embeddings
    vocab = m.config.text_config.vocab_size
  else:
    m = open_clip.create_model(args.model_name, pretrained=args.real).eval()
    size, ctx, vocab = m.visual.image_size[0], m.context_length, m.vocab_size
  imgs, toks = images(size), tokens(vocab, ctx)
  if args.format == "hf_clip":
    with torch.no_grad():
      o = m(input_ids=torch.from_numpy(toks), pixel_values=torch.from_numpy(imgs))
    save_ref(args.out, imgs, toks, o.image_embeds, o.text_embeds, m.logit_scale.exp().item())
  else:
    save_ref(args.out, imgs, toks, *open_clip_refs(m, imgs, toks))
  print("wrote", args.out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="tests/fixtures/interop/clip")
  ap.add_argument("--real", default="", help="a real checkpoint (file or HF directory)")
  ap.add_argument("--format", default="open_clip", choices=["open_clip", "openai", "hf_clip"])
  ap.add_argument("--model_name", default="ViT-B-32", help="open_clip model name (--real)")
  args = ap.parse_args()
  torch.set_num_threads(1)
  if args.real:
    make_real(args)
    return
  os.makedirs(args.out, exist_ok=True)
  make_open_clip(args.out)
  make_openai(args.out)
  make_hf_clip(args.out)
  write_readme(args.out, "make_interop_fixtures.py",
               "tiny random models of open_clip and transformers")


if __name__ == "__main__":
  main()
