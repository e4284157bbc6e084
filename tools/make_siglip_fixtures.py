"""Writes the SigLIP weight-import parity fixtures (tests/fixtures/interop/siglip/).

A tiny randomly initialised Hugging Face `SiglipModel` (every parameter, biases, key
biases and LayerNorms included, drawn at random rather than left at their initial
zeros/ones), saved with `save_pretrained` (`model.safetensors`, `config.json`), its
outputs on fixed inputs (`reference.npz`), and the same weights in big_vision's
SigLIP `.npz` layout (`big_vision.npz`), mapped here from big_vision's module names
(models/vit.py, models/proj/image_text/{two_towers,text_transformer}.py) by code
independent of `vlp_jax.interop`. The image tower's blocks are written scanned
(`img/Transformer/encoderblock/...` with a leading layer axis, as in the released
So400m checkpoints), the text tower's unrolled (`encoderblock_{i}`).

Needs the reference libraries; REF_PY is a Python with
`pip install torch==2.14.1 open_clip_torch==3.3.0 transformers==5.24.0 safetensors==0.8.0`:

    REF_PY tools/make_siglip_fixtures.py [--out=DIR]

With `--from_pretrained=DIR` (a downloaded HF SigLIP folder) it instead writes only
`reference.npz`: that model's outputs on random inputs of its own sizes, for the
opt-in real-checkpoint parity test (tests/test_interop_siglip.py,
VLP_SIGLIP_CHECKPOINT / VLP_SIGLIP_REFERENCE).
"""
import argparse
import os

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "interop", "siglip")

TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_size=32,
            pad_token_id=1, eos_token_id=1, bos_token_id=None)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)
EOS = 1  # SigLIP's tokenizer pads with its end token (id 1).


def build_model(seed=0):
  torch.manual_seed(seed)
  config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
  model = transformers.SiglipModel(config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name == "logit_scale":
        p.copy_(torch.full_like(p, float(np.log(10.0))) + 0.1 * noise)
      elif name == "logit_bias":
        p.copy_(torch.full_like(p, -2.0) + 0.1 * noise)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        fan_in = p.shape[-1] if p.ndim > 1 else 1
        p.copy_(noise / max(fan_in, 1) ** 0.5)
  return model


def inputs(seed=2, image_size=VISION["image_size"], length=TEXT["max_position_embeddings"],
           vocab=TEXT["vocab_size"], pad=EOS):
  """Pixels as the model sees them ([B, 3, H, W] in [-1, 1], SigLIP's normalisation)
  and token ids padded as SigLIP's tokenizer pads (with its end token, to full length)."""
  rng = np.random.default_rng(seed)
  pixels = rng.uniform(-1, 1, (2, 3, image_size, image_size))
  ids = np.full((3, length), pad, np.int64)
  for row, n in enumerate((5, 9, length - 1)):  # words, then EOS padding to the end
    ids[row, :n] = rng.integers(2, vocab, n)
  return pixels.astype(np.float32), ids


def reference(model, pixels, ids):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids))
  return dict(pixel_values=pixels, input_ids=ids.astype(np.int32),
              image_embeds=out.image_embeds.numpy(), text_embeds=out.text_embeds.numpy(),
              logits_per_image=out.logits_per_image.numpy(),
              logit_scale=np.exp(model.logit_scale.detach().numpy()),
              logit_bias=model.logit_bias.detach().numpy())


def to_big_vision(sd, n_img, n_txt, heads_img, heads_txt):
  """HF SigLIP state dict -> big_vision two_towers names (flax layouts)."""
  a = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
  out = {}

  def attn(dst, q, k, v, o, heads):
    width = o[0].shape[0]
    hd = width // heads
    for name, (w, b) in (("query", q), ("key", k), ("value", v)):
      out[f"{dst}/{name}/kernel"] = w.T.reshape(w.shape[1], heads, hd)
      out[f"{dst}/{name}/bias"] = b.reshape(heads, hd)
    out[f"{dst}/out/kernel"] = o[0].T.reshape(heads, hd, width)
    out[f"{dst}/out/bias"] = o[1]

  def dense(dst, src):
    out[f"{dst}/kernel"] = a[f"{src}.weight"].T
    out[f"{dst}/bias"] = a[f"{src}.bias"]

  def norm(dst, src):
    out[f"{dst}/scale"] = a[f"{src}.weight"]
    out[f"{dst}/bias"] = a[f"{src}.bias"]

  def block(dst, src, heads):
    norm(f"{dst}/LayerNorm_0", f"{src}.layer_norm1")
    norm(f"{dst}/LayerNorm_1", f"{src}.layer_norm2")
    p = lambda n: (a[f"{src}.self_attn.{n}.weight"], a[f"{src}.self_attn.{n}.bias"])
    attn(f"{dst}/MultiHeadDotProductAttention_0", p("q_proj"), p("k_proj"),
         p("v_proj"), p("out_proj"), heads)
    dense(f"{dst}/MlpBlock_0/Dense_0", f"{src}.mlp.fc1")
    dense(f"{dst}/MlpBlock_0/Dense_1", f"{src}.mlp.fc2")

  v = "vision_model"
  out["img/embedding/kernel"] = a[f"{v}.embeddings.patch_embedding.weight"].transpose(
      2, 3, 1, 0)
  out["img/embedding/bias"] = a[f"{v}.embeddings.patch_embedding.bias"]
  out["img/pos_embedding"] = a[f"{v}.embeddings.position_embedding.weight"][None]
  for i in range(n_img):
    block(f"img/Transformer/encoderblock_{i}", f"{v}.encoder.layers.{i}", heads_img)
  norm("img/Transformer/encoder_norm", f"{v}.post_layernorm")
  h = f"{v}.head"
  out["img/MAPHead_0/probe"] = a[f"{h}.probe"]
  wq, wk, wv = np.split(a[f"{h}.attention.in_proj_weight"], 3)
  bq, bk, bv = np.split(a[f"{h}.attention.in_proj_bias"], 3)
  attn("img/MAPHead_0/MultiHeadDotProductAttention_0", (wq, bq), (wk, bk), (wv, bv),
       (a[f"{h}.attention.out_proj.weight"], a[f"{h}.attention.out_proj.bias"]),
       heads_img)
  norm("img/MAPHead_0/LayerNorm_0", f"{h}.layernorm")
  dense("img/MAPHead_0/MlpBlock_0/Dense_0", f"{h}.mlp.fc1")
  dense("img/MAPHead_0/MlpBlock_0/Dense_1", f"{h}.mlp.fc2")

  t = "text_model"
  out["txt/Embed_0/embedding"] = a[f"{t}.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = a[f"{t}.embeddings.position_embedding.weight"][None]
  for i in range(n_txt):
    block(f"txt/Encoder_0/encoderblock_{i}", f"{t}.encoder.layers.{i}", heads_txt)
  norm("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
  dense("txt/head", f"{t}.head")
  out["t"] = a["logit_scale"].reshape(1)
  out["b"] = a["logit_bias"].reshape(1)

  # Scan the image tower's blocks, as big_vision's Encoder(scan=True) stores them.
  prefix = "img/Transformer/encoderblock_"
  rest = sorted({k[len(prefix):].split("/", 1)[1] for k in out if k.startswith(prefix)})
  for name in rest:
    out[f"img/Transformer/encoderblock/{name}"] = np.stack(
        [out.pop(f"{prefix}{i}/{name}") for i in range(n_img)])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=OUT)
  parser.add_argument("--from_pretrained", default="",
                      help="A downloaded HF SigLIP folder: write only its reference.npz.")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.from_pretrained:
    model = transformers.SiglipModel.from_pretrained(
        args.from_pretrained, torch_dtype=torch.float32).eval()
    vc, tc = model.config.vision_config, model.config.text_config
    pixels, ids = inputs(image_size=vc.image_size, length=tc.max_position_embeddings,
                         vocab=tc.vocab_size, pad=tc.pad_token_id or EOS)
    np.savez(os.path.join(args.out, "reference.npz"), **reference(model, pixels, ids))
    print(f"wrote {os.path.join(args.out, 'reference.npz')}")
    return
  model = build_model()
  model.save_pretrained(args.out, safe_serialization=True)
  pixels, ids = inputs()
  np.savez(os.path.join(args.out, "reference.npz"), **reference(model, pixels, ids))
  bv = to_big_vision(model.state_dict(), VISION["num_hidden_layers"],
                     TEXT["num_hidden_layers"], VISION["num_attention_heads"],
                     TEXT["num_attention_heads"])
  np.savez(os.path.join(args.out, "big_vision.npz"), **bv)
  for name in sorted(os.listdir(args.out)):
    print(f"{name}: {os.path.getsize(os.path.join(args.out, name))} bytes")


if __name__ == "__main__":
  main()
