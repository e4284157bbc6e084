"""Benchmark base: a tiny CLIP on the built-in `shapes:hard` data, a few CPU minutes.

    python main.py --config=configs/bench.py --workdir=/tmp/bench_s0 --config.seed=0

`shapes` is at its ceiling for every method (zero-shot 1.000 after ~800 steps);
`shapes:hard` (vlp_jax/data/shapes.py: 64 colour x shape classes, fills, clutter, 1-3
objects with relations, 8 held-out pairs) is not, so training methods can be compared
on it. Method recipes override this base (objectives, model.name, data.mixture with
'shapes:hard,classes', ...). Evaluations run once, at the end, on fixed eval sets (the
eval splits do not depend on config.seed):

  zeroshot        test split: all 64 classes, 1 in 8 a pair never seen in training
  zeroshot_heldout  heldout split: the held-out pairs only (compositional)
  retrieval       test split, 3-5 captions per image
  retrieval_rel   relations split: two-object twins that differ only in which colour
                  goes with which shape (word order / binding)

Calibration (README "Benchmark"; 2 CPU cores): see the module docstring of
vlp_jax/data/shapes.py for the data and the figures in the report of the bench's
introduction.
"""
from configs import common
from vlp_jax.config import default_config

SOURCE = "shapes:hard"
TOKENIZER = "words:shapes_hard"  # 56 ids; captions fit in 20 tokens.


def get_config(arg=None):
  del arg
  c = default_config()
  c.seed = 0
  c.batch_size = 128
  c.total_steps = 300
  c.log_every = 50
  c.checkpoint_every = 300
  c.plot = False

  c.model.name = "two_tower"
  c.model.embed_dim = 128
  c.model.image.update(variant="", width=128, depth=4, mlp_dim=512, num_heads=4,
                       patch_size=16)
  c.model.text.update(vocab_size=64, width=128, depth=2, mlp_dim=512, num_heads=4,
                      context_length=20)

  c.objectives = {"clip": 1.0}
  c.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.05, b2=0.98)

  c.data.update(source=SOURCE, image_size=64, tokenizer=TOKENIZER,
                normalization="inception")

  c.evals = {
      "zeroshot": common.eval_entry(type="zeroshot", every=0, source=SOURCE,
                                    split="test", size=512, batch_size=128),
      "zeroshot_heldout": common.eval_entry(type="zeroshot", every=0, source=SOURCE,
                                            split="heldout", size=256, batch_size=128),
      "retrieval": common.eval_entry(type="retrieval", every=0, source=SOURCE,
                                     split="test", size=512, batch_size=128),
      "retrieval_rel": common.eval_entry(type="retrieval", every=0, source=SOURCE,
                                         split="relations", size=256, batch_size=128),
  }
  return c
