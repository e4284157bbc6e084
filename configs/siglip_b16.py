"""SigLIP ViT-B/16 (Zhai et al., 2023): pairwise sigmoid loss.

Image tower ViT-B/16 at 224 px with a MAP (attention-pooling) head; text transformer
12 x 512, context 77, bidirectional, CLIP's BPE tokenizer ('clip', built in), pooled
at the last real token ('eos') with the padding mask (a bidirectional tower must not
attend to padding; CLIP's '!' shares id 0 with padding, so it is masked too).
Temperature t' = log 10 and bias b = -10 at init. Optimiser: AdamW lr 1e-3, weight
decay 1e-4, beta2 0.95 (the paper's stability setting), cosine decay; batch 32,768.

The published SigLIP B/16 uses a B-sized text tower with 64 tokens and a 32k T5-style
SentencePiece vocabulary (no BOS, padded with EOS, pooled at the last position): give
its spiece.model with --config.data.tokenizer=siglip:/path/spiece.model
--config.model.text.vocab_size=32000 --config.model.text.context_length=64
--config.model.text.pool=last --config.model.text.padding_mask=False (or a SigLIP 2
tokenizer.json with hf:/path). Start-up checks reject a tokenizer that does not pad
with id 0 while the text tower masks or pools by id 0.

    python main.py --config=configs/siglip_b16.py --workdir=/tmp/siglip \
        --config.data.source=jsonl:/data/webli/train.jsonl
"""
import math

from configs import common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run of the same model family on shapes."""
  arg = common.parse_arg(arg, runlocal=False)
  c = common.b16_recipe()
  c.batch_size = 32768
  c.total_steps = 275_000  # ~9B examples seen.

  c.model.name = "two_tower"
  c.model.embed_dim = 768
  c.model.image.pool = "map"
  c.model.text.causal = False
  c.model.logit_scale_init = math.log(10.0)
  c.model.use_logit_bias = True
  c.model.logit_bias_init = -10.0

  c.objectives = {"siglip": 1.0}
  c.optim.update(lr=1e-3, warmup_steps=5000, weight_decay=1e-4, b1=0.9, b2=0.95,
                 eps=1e-8, grad_clip_norm=1.0)

  c.data.normalization = "inception"
  return common.runlocal(c) if arg.runlocal else c
