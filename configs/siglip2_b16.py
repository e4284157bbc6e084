"""SigLIP 2-style ViT-B/16 (Tschannen et al., 2025): sigmoid loss + captioning
decoder, plus self-distillation and masked prediction (SILC, TIPS) for the last 20% of
training against a momentum (EMA) teacher.

Model: the CoCa family (vlp_jax layout): ViT-B/16 at 256 px (256 patches, as the
paper), attention-pooled (MAP) image embedding, text context 64 (as the paper), a
12-layer text decoder cross-attending to 256 pooled image queries. Objectives:

    siglip             1.0   sigmoid loss, t' = log 10, b = -10 at init
    caption            1.0   the decoder's next-token loss (weight: our choice)
    self_distill       1.0   8 local 96 px crops (scale 0.05-0.4) vs the teacher's
                             embedding of the full image (vlp_jax/objectives/siglip2.py)
    masked_prediction  0.25  50% of the patches masked in a second student pass vs the
                             teacher's tokens at those patches

The last two are 0 before step floor(0.8 total_steps) (objective options
`start_fraction`, `total_steps`). Teacher: an EMA of every parameter, fixed momentum
0.996 (SILC keeps the momentum fixed; its value is our choice). Optimiser: AdamW lr 1e-3,
weight decay 1e-4, beta2 0.95 (configs/siglip_b16.py), 20k warm-up steps and cosine
decay, batch 32,768 for 40B examples (the paper's).

Differences from the paper (README "SigLIP 2-style recipe"): the text tower is
CoCa's causal unimodal stack (SigLIP 2: a bidirectional encoder and a separate LocCa
decoder); only holistic captioning (no referring-expression / grounded-captioning
tasks); the decoder reads 256 attention-pooled queries, not the raw patch tokens; the
two self-supervised terms use cosine feature matching without DINO / iBOT heads; SILC's
two global crops are reduced to the main image (batch['image']), which the sigmoid and
caption losses also see; the teacher is an EMA from step 0 (SigLIP 2 creates it at 80%).

    python main.py --config=configs/siglip2_b16.py --workdir=/tmp/siglip2 \
        --config.data.source=jsonl:/data/webli/train.jsonl
"""
import math

from configs import common
from vlp_jax.data import views

SELF_SUPERVISED = ("self_distill", "masked_prediction")


def fill_schedule(c, start_fraction: float = 0.8):
  """Starts the self-supervised objectives at `start_fraction` of training (their
  `total_steps` follows config.total_steps, also when overridden on the command
  line: `vlp_jax/objectives/combine.options`)."""
  c.objective_cfg = {name: {"start_fraction": start_fraction}
                     for name in SELF_SUPERVISED}
  return c


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = 32768
  c.total_steps = 40_000_000_000 // c.batch_size  # 40B examples seen.

  c.model.name = "coca"
  c.model.embed_dim = 768
  c.model.decoder.update(depth=12, num_queries=256)
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0
  c.model.masked_image_ratio = 0.5
  c.model.text.context_length = 64
  c.data.update(image_size=256, normalization="inception")

  # Global view = batch['image']; local crops for self-distillation.
  c.data.views = {"local": views.image_view_entry(count=8, size=96,
                                                  crop_scale=(0.05, 0.4))}
  c.teacher.update(params=[".*"], momentum=0.996, schedule="constant")

  c.objectives = {"siglip": 1.0, "caption": 1.0, "self_distill": 1.0,
                  "masked_prediction": 0.25}
  fill_schedule(c)
  c.optim.update(lr=1e-3, warmup_steps=20_000, weight_decay=1e-4, b1=0.9, b2=0.95,
                 eps=1e-8, grad_clip_norm=1.0)
  if not arg.runlocal:
    return c
  c = common.runlocal(c)
  # 64 px images (4 x 4 patches): 2 local crops of 32 px (2 x 2 patches).
  c.data.views.local.update(count=2, size=32)
  return fill_schedule(c)
