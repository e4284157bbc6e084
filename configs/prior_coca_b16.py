"""CoCa ViT-B/16 with PRIOR's prioritised captioning (Chen, Peng, Zhang, Ji, arXiv
2505.08971): the caption loss weights each token by w = 1 - P_ref(token | previous
tokens) under a frozen text-only reference model (renormalised to mean 1 per caption),
so tokens the text alone predicts get less weight and the image-dependent ones more.

Two stages: train the reference with configs/prior_ref_lm_b16.py (the same CoCa,
trained as a text-only LM), then this recipe with its workdir (`ref=`, or
--config.teacher.init_from.workdir; training without one stops with an error):

    python main.py --config=configs/prior_ref_lm_b16.py --workdir=/tmp/prior_ref ...
    python main.py --config=configs/prior_coca_b16.py:ref=/tmp/prior_ref \
        --workdir=/tmp/prior --config.data.source=jsonl:/data/laion/train.jsonl

The reference is the momentum teacher (vlp_jax/train/teacher.py) held frozen
(momentum 1.0) over the parameters 'text_lm_logits' depends on (text tower, decoder,
vocabulary projection), loaded from the reference run's latest checkpoint
(config.teacher.init_from; --config.teacher.init_from.step=N for another step); the
step computes its probabilities in one extra text-only forward pass. Objectives:
contrastive 1 x 'clip' + 2 x 'prior' (CoCa's weights, vlp_jax/objectives/prior.py;
options alpha=1, normalize='caption'). Everything else as configs/coca_b16.py.

Precomputed instead (no reference pass in the step): tools/prior_probs.py writes the
reference probabilities of every caption; then `:ref=...,precomputed=PATH` (README
"PRIOR") uses objective 'prior_data' on batch['ref_probs'] and no teacher.
"""
from configs import coca_b16, common

# What CoCa's 'text_lm_logits' depends on (vlp_jax layout): the frozen reference.
REFERENCE_PARAMS = ["txt/.*", "decoder/.*", "vocab_proj/.*"]


def get_config(arg=None):
  """`arg`: `ref=WORKDIR` (the reference LM's run; needed to train), 'runlocal' for a
  one-minute CPU run on shapes, `precomputed=PATH` for the precomputed path."""
  arg = common.parse_arg(arg, runlocal=False, ref="", precomputed="")
  c = coca_b16.get_config("runlocal" if arg.runlocal else None)
  c.objectives = {"clip": 1.0, "prior": 2.0}
  c.objective_cfg = {"prior": {"alpha": 1.0, "normalize": "caption"}}
  if arg.precomputed:
    c.objectives = {"clip": 1.0, "prior_data": 2.0}
    c.objective_cfg = {"prior_data": {"alpha": 1.0, "normalize": "caption"}}
    c.data.ref_probs = arg.precomputed
    return c
  c.teacher.update(params=list(REFERENCE_PARAMS), momentum=1.0, schedule="constant")
  # Training stops at start-up with an error naming the fix while no reference is set.
  c.teacher.init_from.update(workdir=arg.ref, required=True)
  return c
