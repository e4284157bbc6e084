"""FILIP ViT-B/16 (Yao et al., 2021): token-wise late-interaction contrastive learning.

The two-tower B/16 of `clip_b16.py` with FILIP's per-token projections to 256 dims
(`model.token_embed_dim`): image i and text j are scored by the mean over image
patches of each patch's best-matching text token (image->text) and the mean over
real text tokens of each token's best-matching patch (text->image); the `filip`
objective is the symmetric InfoNCE over these two matrices. Zero-shot and retrieval
evaluation score with the same token-wise similarity (prompt ensembling averages
the similarities, as the paper does).

From the paper: embedding dim 256, learnable temperature from 0.07, LAMB with betas
(0.9, 0.999), eps 1e-4, weight decay 3e-3 (not on biases, norms, embeddings or the
temperature), 3k warmup steps then cosine; FILIP_base used batch 320 x 128 = 40,960
and base lr 2e-3 scaled by sqrt(batch / 512); text length 77. FILIP_base's image
tower is ViT-B/32; this recipe keeps the B/16 tower of the other recipes (override
model.image.variant=B/32 for the paper's). Not reproduced: AutoAugment and
back-translated captions (data augmentation), fp16 token all-gathers.

    python main.py --config=configs/filip_b16.py --workdir=/tmp/filip \
        --config.data.source=jsonl:/data/yfcc/train.jsonl

or on the built-in data: --config.data.source=shapes --config.total_steps=2
--config.batch_size=8 (or `configs/filip_b16.py:runlocal`).
"""
import math

from configs import common

FILIP_BASE_BATCH = 320 * 128


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = FILIP_BASE_BATCH
  c.total_steps = 250_000  # ~30 epochs of 340M pairs.

  c.model.name = "two_tower"
  c.model.image.pool = "cls"
  common.clip_text_pool(c)
  c.model.token_embed_dim = 256

  c.objectives = {"filip": 1.0}
  c.optim.update(name="lamb", lr=2e-3 * math.sqrt(FILIP_BASE_BATCH / 512),
                 warmup_steps=3000, weight_decay=3e-3, b1=0.9, b2=0.999, eps=1e-4)
  if arg.runlocal:
    c = common.runlocal(c)
    c.model.token_embed_dim = 32
    c.optim.lr = 2e-3
  return c
