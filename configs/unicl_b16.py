"""UniCL ViT-B/16 (Yang et al., 2022): one contrastive space for labels and captions.

Trains on a mixture of classification data (class labels become prompt captions,
`data.class_templates`) and image-caption data. The `unicl` objective's targets come
from the label-equality matrix of the global batch: images of the same class are
positives of each other's prompts; a caption is a positive only of its own image.
With every label unique it is exactly CLIP's loss.

    python main.py --config=configs/unicl_b16.py --workdir=/tmp/unicl \
        --config.data.mixture="(('imagefolder:/data/imagenet21k/{split}', 0.5), \
                                ('jsonl:/data/yfcc14m/train.jsonl', 0.5))"

Recipe arguments: `prefix` adds prefix conditioning (Saito et al., 2022: a learned
prefix per data type on the text tower; zero-shot and retrieval use the caption
prefix), `runlocal` a one-minute CPU run on the built-in benchmark's classification
and caption views (`configs/unicl_b16.py:runlocal,prefix`). On the built-in data
with 2 steps: --config.data.mixture="(('shapes:hard,classes', 0.5), ('shapes', 0.5))"
--config.total_steps=2 --config.batch_size=8.

The paper's image towers are Swin-T/B; this recipe keeps the ViT-B/16 of the other
recipes and CLIP's optimiser (the paper's schedule for this mixture is not used here),
with 512-d embeddings and 77 text tokens as the released code.
"""
from configs import common

# The built-in benchmark's classification and caption views (vlp_jax/data/shapes.py).
LOCAL_MIXTURE = (("shapes:hard,classes", 0.5), ("shapes:hard", 0.5))


def get_config(arg=None):
  """`arg`: 'prefix' (prefix conditioning), 'runlocal' (a one-minute CPU run)."""
  arg = common.parse_arg(arg, runlocal=False, prefix=False)
  c = common.b16_recipe()
  c.batch_size = 4096
  c.total_steps = 100_000

  c.model.name = "two_tower"
  c.model.image.pool = "cls"
  c.model.text.prefix_conditioning = arg.prefix
  common.clip_text_pool(c)  # The argmax moves past the prefix (models/text.py).

  c.objectives = {"unicl": 1.0}
  c.data.mixture = (("imagefolder:data/imagenet/{split}", 0.5),
                    ("jsonl:data/train.jsonl", 0.5))
  c.data.class_templates = "imagenet"
  c.optim.update(lr=5e-4, warmup_steps=2000, weight_decay=0.2, b1=0.9, b2=0.98,
                 eps=1e-6, grad_clip_norm=1.0)
  if arg.runlocal:
    c = common.runlocal(c)
    c.data.mixture = LOCAL_MIXTURE
    c.data.class_templates = "auto"
    c.data.tokenizer = "words:shapes_hard"  # Covers shapes:hard and shapes.
    c.model.text.update(vocab_size=64, context_length=20)
  return c
