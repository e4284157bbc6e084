"""CoCa with a ViT-B/16 image encoder (Yu et al., 2022; open_clip's coca layout).

Image 224 px ViT-B/16; attentional poolers: 1 query for the contrastive embedding and
256 queries for the decoder's cross-attention. Text: 12 unimodal causal layers of
width 512 (pooled at the end-of-text token) and 12 multimodal layers with
cross-attention, context 77. Loss = 1 x contrastive + 2 x captioning (the paper's
weights). CoCa's default layout pools at the last non-pad token and masks padding by
id 0 whatever model.text.pool / padding_mask say, so a '!' (id 0 in CLIP's BPE, as
padding) in a caption is masked (the CLIP recipes pool at argmax instead).
Optimiser: lr 8e-4, betas (0.9, 0.999), decoupled weight decay 0.01, warmup 2% of
500k steps, cosine decay (the paper uses Adafactor; AdamW here); batch 65,536.

    python main.py --config=configs/coca_b16.py --workdir=/tmp/coca \
        --config.data.source=jsonl:/data/laion/train.jsonl
"""
from configs import common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = 65536
  c.total_steps = 500_000

  c.model.name = "coca"
  c.model.decoder.update(depth=12, num_queries=256)

  c.objectives = {"clip": 1.0, "caption": 2.0}
  c.optim.update(lr=8e-4, warmup_steps=10_000, weight_decay=0.01, b1=0.9, b2=0.999,
                 eps=1e-8, grad_clip_norm=1.0)

  c.evals.captioning = common.eval_entry(type="captioning", every=-1,
                                  source="jsonl:data/val.jsonl", size=5000, batch_size=64)
  return common.runlocal(c) if arg.runlocal else c
