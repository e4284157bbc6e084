"""CLIP ViT-B/16 (Radford et al., 2021): the published recipe.

Image 224 px, ViT-B/16 with a class token; text transformer 12 x 512, 8 heads, context
77, causal, pooled at the end-of-text token; embeddings 512; temperature initialised
to 1/0.07 and clamped at 100. Optimiser: AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6,
weight decay 0.2, 2000 warmup steps, cosine decay; batch 32,768 for 32 epochs of 400M
pairs (~390k steps).

Data defaults to a user-supplied annotation file; point it at yours:

    python main.py --config=configs/clip_b16.py --workdir=/tmp/clip \
        --config.data.source=jsonl:/data/cc12m/train.jsonl

or try it anywhere on the built-in data: --config.data.source=shapes
--config.total_steps=2 --config.batch_size=8. CLIP's BPE vocabulary has 49,408 ids;
pass a SentencePiece model with --config.data.tokenizer=sentencepiece:/path/spm.model
(the default, 'bytes', needs no file).
"""
from vlp_jax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.batch_size = 32768
  c.total_steps = 390_000
  c.log_every = 100
  c.checkpoint_every = 2000

  c.model.name = "two_tower"
  c.model.embed_dim = 512
  c.model.image.update(variant="B/16", pool="cls")
  c.model.text.update(vocab_size=49408, width=512, depth=12, mlp_dim=2048, num_heads=8,
                      context_length=77, causal=True, pool="eos")

  c.objectives = {"clip": 1.0}
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=1.0)

  c.data.update(source="jsonl:data/train.jsonl", image_size=224, tokenizer="bytes",
                normalization="clip")

  # Enable with --config.evals.retrieval.every=N (0 = only at the end).
  c.evals = {"retrieval": dict(type="retrieval", every=-1, source="jsonl:data/val.jsonl",
                               size=5000, batch_size=256)}
  return c
