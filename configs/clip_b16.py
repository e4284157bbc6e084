"""CLIP ViT-B/16 (Radford et al., 2021): the published recipe.

Image 224 px, ViT-B/16 with a class token; text transformer 12 x 512, 8 heads, context
77, causal, pooled at the end-of-text token (CLIP's highest id: pool 'argmax', with no
padding mask, since id 0 is also '!'); embeddings 512; temperature initialised to
1/0.07 and clamped at 100. Optimiser: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6,
weight decay 0.2, 2000 warmup steps, cosine decay; batch 32,768 for 32 epochs of 400M
pairs (~390k steps).

Data defaults to a user-supplied annotation file; point it at yours:

    python main.py --config=configs/clip_b16.py --workdir=/tmp/clip \
        --config.data.source=jsonl:/data/cc12m/train.jsonl

or try it anywhere on the built-in data: --config.data.source=shapes
--config.total_steps=2 --config.batch_size=8. Text is tokenized with CLIP's BPE
('clip', built in, 49,408 ids at context 77: open_clip's ids); other tokenizers:
--config.data.tokenizer=hf:/path/tokenizer.json, sentencepiece:/path/spm.model or
bytes, with model.text.vocab_size at least the tokenizer's and, as their EOS is not
their highest id, --config.model.text.pool=eos --config.model.text.padding_mask=True
(checked at start-up).
"""
from configs import common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes;
  'small' for the small CPU model of the open_clip comparison (README "Performance")."""
  arg = common.parse_arg(arg, runlocal=False, small=False)
  c = common.b16_recipe()
  c.batch_size = 32768
  c.total_steps = 390_000

  c.model.name = "two_tower"
  c.model.image.pool = "cls"
  common.clip_text_pool(c)

  c.objectives = {"clip": 1.0}
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=1.0)
  if arg.small:
    small(c)
  return common.runlocal(c) if arg.runlocal else c


def small(c):
  """A small CLIP for CPU speed comparisons (tools/compare_open_clip.py with
  tools/open_clip_small_cpu.json): 64 px images, a 4 x 192 ViT (3 heads, patch 8),
  a 4 x 128 text tower (2 heads) with CLIP's context 77 and 49,408 ids, embeddings
  128, float32, batch 64."""
  c.batch_size = 64
  c.model.dtype = "float32"
  c.model.embed_dim = 128
  c.model.image.update(variant="", width=192, depth=4, mlp_dim=768, num_heads=3,
                       patch_size=8)
  c.model.text.update(width=128, depth=4, mlp_dim=512, num_heads=2)
  c.data.image_size = 64
