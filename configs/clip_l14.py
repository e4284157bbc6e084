"""CLIP ViT-L/14 (Radford et al., 2021), at 224 px or 336 px (`:res=336`, the
published ViT-L/14@336px).

Image tower ViT-L/14 (24 x 1024, 16 heads) with a class token; text transformer
12 x 768, 12 heads, context 77, causal, pooled at the end-of-text token; embeddings
768. Blocks as clip_b16's (tanh GELU, no LayerNorm before the encoder); OpenAI's own
are --config.model.mlp_act=quick_gelu --config.model.image.ln_pre=True
--config.model.layer_norm_eps=1e-5. Optimiser as the paper's Table 20: AdamW lr 4e-4, betas (0.9, 0.98), eps 1e-6,
weight decay 0.2, 2000 warmup steps, cosine; batch 32,768.

Laid out for a TPU v5e-256 slice (16 GB per chip): FSDP over the 256 chips, scanned
blocks, full remat, and at 336 px two micro-batches (accum_steps=2; in one, the step
needs 98% of a chip's HBM) (`common.pod_layout`; README "Pod-scale recipes" has its AOT report):

    python tools/aot_compile.py --config=configs/clip_l14.py --topology=v5e-256
    python main.py --config=configs/clip_l14.py --workdir=gs://bucket/clip_l14 \\
        --config.data.source=arrayrecord:/data/laion/train-*.arrayrecord

`:h100x8`: one node of 8 x H100 80 GB (FSDP over 8 GPUs, batch 1024 per node, cuDNN
attention); `:runlocal` is a one-minute CPU run of the same family.
"""
from configs import clip_b16, common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, h100x8=False, res=224)
  c = clip_b16.get_config()  # loss, text pooling, batch, schedule
  c.model.embed_dim = 768
  c.model.image.update(variant="L/14", pool="cls")
  c.model.text.update(width=768, num_heads=12, mlp_dim=3072)
  c.data.image_size = arg.res
  if arg.res > 224:  # 577 tokens at 336 px: two micro-batches keep v5e's HBM half free
    c.accum_steps = 2
  c.optim.lr = 4e-4  # the paper's for L/14; the rest as clip_b16
  common.pod_layout(c)
  if arg.h100x8:
    common.h100x8_layout(c, batch_size=1024)
  return common.runlocal(c) if arg.runlocal else c
