"""Demo: a small CoCa (contrastive + captioning) trained on the built-in `shapes` data.

    make demo      # = python main.py --config=configs/demo.py --workdir=runs/demo

Trains in minutes on a laptop CPU and evaluates zero-shot classification, retrieval
and captioning on the shapes validation split.
"""
from configs import common
from vlp_jax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.seed = 0
  c.batch_size = 128
  c.total_steps = 800
  c.log_every = 50
  c.checkpoint_every = 200

  c.model.name = "coca"
  c.model.embed_dim = 128
  c.model.image.update(variant="", width=128, depth=4, mlp_dim=512, num_heads=4,
                       patch_size=16)
  c.model.text.update(vocab_size=48, width=128, depth=2, mlp_dim=512, num_heads=4,
                      context_length=24)
  c.model.decoder.update(depth=2, num_queries=16)

  c.objectives = {"clip": 1.0, "caption": 2.0}  # CoCa's weighting.
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.05, b2=0.98)

  # Word-level tokens over the shapes vocabulary (43 ids): captions fit in 24 tokens.
  c.data.update(source="shapes", image_size=64, tokenizer="words:shapes",
                normalization="inception")

  c.evals = {
      "zeroshot": common.eval_entry(type="zeroshot", every=200, split="validation", size=480,
                                    templates="shapes"),  # vocabulary of words:shapes
      "retrieval": common.eval_entry(type="retrieval", every=200, split="validation", size=480),
      "captioning": common.eval_entry(type="captioning", every=0, split="validation", size=240),
  }
  return c
