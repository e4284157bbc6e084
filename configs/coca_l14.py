"""CoCa-L/14: CoCa (Yu et al., 2022) at the sizes of open_clip's coca_ViT-L-14, in
vlp_jax's CoCa layout (coca_b16's: two attention pools, one multimodal block per
layer; --config.model.coca_layout=open_clip with decoder.pool_heads=8 and context 76
for open_clip's own layout, e.g. to load its weights).

Image 224 px ViT-L/14 (24 x 1024, 16 heads); attentional poolers (1 contrastive query,
256 for the decoder); text: 12 unimodal causal layers of width 768 (12 heads) and 12
multimodal layers with cross-attention, context 77; embeddings 768. Loss = 1 x
contrastive + 2 x captioning. Optimiser as coca_b16.py; batch 65,536. (The paper's
CoCa-Large instead uses 288 px images at patch 18 and a 1024-wide text decoder.)

Laid out for a TPU v4-1024 slice (512 chips, 32 GiB each): 8-way data x 64-way
FSDP (768 = 12 x 64; 8 x 64 is the slice's 8x8x8 torus), scanned blocks, full remat (`common.pod_layout`; README "Pod-scale recipes"):

    python tools/aot_compile.py --config=configs/coca_l14.py --topology=v4-1024

`:h100x8`: one 8 x H100 node (batch 1024); `:runlocal`: one minute on a CPU.
"""
from configs import coca_b16, common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, h100x8=False)
  c = coca_b16.get_config()
  c.model.embed_dim = 768
  c.model.image.update(variant="L/14")
  c.model.text.update(width=768, num_heads=12, mlp_dim=3072)
  common.pod_layout(c, data=8)
  if arg.h100x8:
    common.h100x8_layout(c, batch_size=1024)
  return common.runlocal(c) if arg.runlocal else c
