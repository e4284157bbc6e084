"""PRIOR's reference model (Chen et al., arXiv 2505.08971): CoCa's text decoder trained
as a text-only language model on the captions, without the images.

The model is configs/coca_b16.py's CoCa (same architecture, so configs/prior_coca_b16.py
can load its text tower, decoder and vocabulary projection as its frozen reference);
the only objective is 'text_lm' (vlp_jax/objectives/prior.py): next-token cross
entropy on 'text_lm_logits', the decoder with cross-attention skipped. The image tower
and the contrastive heads get no gradient (nothing reads them; XLA drops the image
pass). Optimiser, batch and steps as configs/coca_b16.py (our choice: the paper trains
its reference LLM with plain next-token prediction and gives no schedule). No
evaluators (the embeddings are not trained).

    python main.py --config=configs/prior_ref_lm_b16.py --workdir=/tmp/prior_ref \
        --config.data.source=jsonl:/data/laion/train.jsonl

Then configs/prior_coca_b16.py:ref=/tmp/prior_ref (README "PRIOR").
"""
from configs import coca_b16, common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = coca_b16.get_config("runlocal" if arg.runlocal else None)
  c.objectives = {"text_lm": 1.0}
  c.evals = {}
  return c
