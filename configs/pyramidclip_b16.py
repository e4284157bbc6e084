"""PyramidCLIP ViT-B/16 (Gao et al., NeurIPS 2022), two-level pyramid (no ROI level).

CLIP's ViT-B/16 two-tower model (configs/clip_b16.py) trained with the 'pyramidclip'
objective (vlp_jax/objectives/pyramidclip.py): peer-level and cross-level alignment
between {global view, local view} of the image and {short form, original} of the
caption, each a symmetric InfoNCE with softened negatives.

Views: the global view is batch['image'] as a random resized crop of 90-100% of the
image, the local view one crop of 50-100% (both ranges from a secondary summary of
the paper, not its text), at the same resolution (our ViT has a fixed position
table). The paper's text summary comes from a pretrained summariser; nothing
downloads here, so the stand-in is the caption's first sentence cut to 12 words
(`text_views.short`). The ROI level (detector regions with category and attribute
tags) and its relation module are not implemented.

Schedule: the paper trains 32 epochs on YFCC15M (15M pairs); at batch 4,096 that is
~117k steps. The batch size and optimiser settings are not confirmed from the paper:
CLIP's (AdamW lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay 0.2, 2,000 warm-up
steps, cosine decay). Softening alpha = 0.2 and equal peer / cross weights are our
choices (objective options, see the objective's docstring).

    python main.py --config=configs/pyramidclip_b16.py --workdir=/tmp/pyramidclip \
        --config.data.source=jsonl:/data/yfcc15m/train.jsonl

or try it anywhere: --config=configs/pyramidclip_b16.py:runlocal.
"""
from configs import common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = 4096
  c.total_steps = 32 * 15_000_000 // c.batch_size

  c.model.name = "two_tower"
  c.model.image.pool = "cls"
  common.clip_text_pool(c)

  # The pyramid: global = batch['image'], local = views/local, short = text_views/short.
  c.data.crop_scale = [0.9, 1.0]
  c.data.views = {"local": {"count": 1, "size": 0, "crop_scale": [0.5, 1.0]}}
  c.data.text_views = {"short": {"kind": "first_sentence", "words": 12}}

  c.objectives = {"pyramidclip": 1.0}
  c.objective_cfg = {"pyramidclip": {"negative_smoothing": 0.2, "peer_weight": 1.0,
                                     "cross_weight": 1.0}}
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=1.0)
  if not arg.runlocal:
    return c
  c = common.runlocal(c)
  # Shapes captions are one short sentence: a 4-word summary differs from them.
  c.data.text_views.short.words = 4
  return c
