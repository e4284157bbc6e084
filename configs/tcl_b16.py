"""TCL ViT-B/16 (Yang et al., CVPR 2022): triple contrastive learning, dual encoder.

A two-tower B/16 with a momentum (EMA) copy of every parameter (`config.teacher`,
momentum 0.995) and queues of 65,536 momentum image / text embeddings
(`config.queue`), trained with the `tcl` objective (vlp_jax/objectives/tcl.py): the
mean of cross-modal alignment with momentum distillation (i2t, t2i), intra-modal
contrast (image view 1 vs momentum view 2, text vs momentum text) and local mutual
information (online global vs the momentum model's pooled patches / text tokens).

Two views per image, as TCL: batch['image'] (the online view) and one crop of the
`aug` view group (the momentum view), at TCL's 256 px (a 16 x 16 patch grid, pooled
to 4 x 4 locals; the pooling needs a grid side that is a perfect square). The text
tower is bidirectional and pools its first position (as TCL's BERT [CLS]); its other
positions are the text locals. From the official code (configs/Pretrain.yaml,
Pretrain.py): embed dim 256, temperature 0.07 learnable in [0.001, 0.5], alpha 0.4
ramped from 0 over the first epoch, AdamW lr 1e-4 (warm-up 2,000 steps, cosine to
1e-5), weight decay 0.02, betas (0.9, 0.999), no clipping, batch 64 x 8 GPUs = 512,
30 epochs of the 4M-image set (~7,800 steps an epoch at 512; our estimate), text
length 25.

Not reproduced: TCL's ITM and MLM losses (they need its fusion encoder: this is a
dual encoder), RandAugment(2, 7) and the colour jitter / grey / blur on the online
view (config.data has crop and flip only; the momentum view gets the full photometric
pipeline), BERT-base as the text tower (CLIP's 12 x 512 here, on CLIP's BPE), the
DeiT initialisation of the ViT (use config.init_from), and no weight decay on biases /
norms only as our optimizer does it (kernels only).

    python main.py --config=configs/tcl_b16.py --workdir=/tmp/tcl \
        --config.data.source=jsonl:/data/cc3m/train.jsonl

or try it anywhere: --config=configs/tcl_b16.py:runlocal.
"""
import math

from configs import common

BATCH = 64 * 8  # TCL: 64 per GPU on 8 GPUs.
STEPS_PER_EPOCH = 4_000_000 // BATCH  # The 4M-image pre-training set (approximate).


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = BATCH
  c.total_steps = 30 * STEPS_PER_EPOCH

  c.model.name = "two_tower"
  c.model.embed_dim = 256
  c.model.image.pool = "cls"
  # BERT-like text tower: bidirectional, pooled at position 0 ([CLS] / BOS).
  c.model.text.update(causal=False, pool="first", padding_mask=True, context_length=25)
  c.model.logit_scale_init = math.log(1 / 0.07)
  c.model.logit_scale_max = 1 / 0.001  # temp >= 0.001; temp <= 0.5 is the objective's.

  c.data.image_size = 256
  c.data.crop_scale = [0.2, 1.0]
  c.data.flip = True
  c.data.views = {"aug": {"count": 1, "size": 0, "crop_scale": [0.2, 1.0],
                          "flip": True, "color_jitter": [0.4, 0.4, 0.4, 0.1],
                          "jitter_p": 0.8, "grayscale": 0.2, "blur": 0.5}}

  c.teacher.update(params=[".*"], momentum=0.995, schedule="constant")
  c.queue.update(size=65536, entries={"image": "teacher_view_emb/aug",
                                      "text": "teacher_text_emb"})

  c.objectives = {"tcl": 1.0}
  c.objective_cfg = {"tcl": {"alpha": 0.4, "alpha_warmup_steps": STEPS_PER_EPOCH,
                             "min_logit_scale": 1 / 0.5}}
  c.optim.update(name="adamw", lr=1e-4, warmup_steps=2000, end_lr_ratio=0.1,
                 weight_decay=0.02, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0)
  if not arg.runlocal:
    return c
  c = common.runlocal(c)  # 64 px at patch 16: a 4 x 4 grid, 2 x 2 locals.
  c.model.text.update(causal=False, pool="first", padding_mask=True)
  c.queue.size = 64  # A multiple of runlocal's batch (32) and of batch 8.
  c.objective_cfg.tcl.alpha_warmup_steps = 10
  c.optim.lr = 5e-4
  return c
