"""SigLIP So400m/14 (Zhai et al., 2023; Alabdulmohsin et al., 2023 for the shape).

Image tower So400m/14 (27 x 1152, MLP 4304, 16 heads) with a MAP head at 224 px
(`:res=384` for the 384 px model); text tower of the same shape (27 x 1152, 16 heads),
bidirectional, context 64, pooled at the last token; embeddings 1152: the MAP head's
output is the image embedding (no image projection), the text projection has a bias,
as big_vision's; sigmoid loss with t' = log 10 and b = -10 at init. The text settings
are those of the published model's 32k SentencePiece vocabulary (vocab 32,000, no
padding mask, 'last' pooling): give it with
--config.data.tokenizer=siglip:/path/spiece.model (the default path,
data/spiece.model, is a placeholder a run reports as missing).
Optimiser as siglip_b16.py (AdamW lr 1e-3, wd 1e-4, beta2 0.95); batch 32,768.

Laid out for a TPU v5p-512 slice (256 chips, 95 GB each): 4-way data x 64-way
FSDP (1152 = 18 x 64; 4 x 64 is the slice's 4x8x8 torus), scanned blocks, full remat (`common.pod_layout`; README "Pod-scale recipes"):

    python tools/aot_compile.py --config=configs/siglip_so400m.py --topology=v5p-512

`:h100x8`: one 8 x H100 node (batch 512); `:runlocal`: one minute on a CPU.
"""
from configs import common, siglip_b16


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, h100x8=False, res=224)
  c = siglip_b16.get_config()  # loss, temperature and bias init, optimiser, batch
  c.model.embed_dim = 1152
  c.model.image.update(variant="So400m/14", pool="map")
  c.model.text.update(vocab_size=32000, width=1152, depth=27, mlp_dim=4304,
                      num_heads=16, context_length=64, causal=False, pool="last",
                      padding_mask=False)
  c.model.image.proj = False
  c.model.proj_bias = True
  c.data.update(image_size=arg.res, tokenizer="siglip:data/spiece.model")
  common.pod_layout(c, data=4)
  if arg.h100x8:
    common.h100x8_layout(c, batch_size=512)
  return common.runlocal(c) if arg.runlocal else c
