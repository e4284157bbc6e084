"""CLIP ViT-bigG/14 (open_clip's LAION-2B model; Cherti et al., 2023).

Image tower ViT-G/14 in big_vision's naming, open_clip's bigG (48 x 1664, MLP 8192,
16 heads) at 224 px with a class token; text transformer 32 x 1280, 20 heads, MLP 5120,
context 77, causal, pooled at the end-of-text token; embeddings 1280; 2.5B parameters.
Blocks as clip_b16's; open_clip's are --config.model.mlp_act=gelu
--config.model.image.ln_pre=True --config.model.layer_norm_eps=1e-5.
Optimiser: AdamW lr 1e-3 (scaled down from open_clip's 2048-GPU run at batch 160k),
betas (0.9, 0.95), eps 1e-6, weight decay 0.2, cosine; batch 65,536 (--config.
batch_size=163840 for the published 160k, with --config.accum_steps to fit).

Laid out for a TPU v5p-512 slice (256 chips, 95 GB each): 4-way data x 64-way FSDP
(1664 = 26 x 64; 4 x 64 is the slice's 4x8x8 torus), scanned blocks, full remat (`common.pod_layout`; README "Pod-scale recipes"):

    python tools/aot_compile.py --config=configs/clip_bigg14.py --topology=v5p-512

`:h100x8`: one 8 x H100 node (batch 256); `:runlocal`: one minute on a CPU.
"""
from configs import clip_b16, common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, h100x8=False)
  c = clip_b16.get_config()  # loss, text pooling
  c.batch_size = 65536
  c.total_steps = 200_000
  c.model.embed_dim = 1280
  c.model.image.update(variant="G/14", pool="cls")
  c.model.text.update(width=1280, depth=32, mlp_dim=5120, num_heads=20)
  c.optim.update(lr=1e-3, warmup_steps=10_000, b2=0.95)
  common.pod_layout(c, data=4)
  if arg.h100x8:
    common.h100x8_layout(c, batch_size=256)
  return common.runlocal(c) if arg.runlocal else c
