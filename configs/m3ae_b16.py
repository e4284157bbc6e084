"""M3AE base (Geng et al., 2022, "Multimodal Masked Autoencoders Learn Transferable
Representations"), as the authors' JAX code and its README pre-training command.

One ViT-B encoder (768 wide, 12 layers, 12 heads, patch 16) over [CLS] + 25% of the
patches + 25% of the text positions (one random mask shared by the batch); decoder
512 wide, 8 layers, 16 heads; image 256 px (256 patches), text 64 tokens. Losses:
masked-patch MSE on the dataset-normalised pixels (weight 1.0) + masked-token
cross-entropy (weight 0.5, the README command; the code's flag default is 0.1).
Optimiser: AdamW, betas (0.9, 0.95), weight decay 0.05 on kernels, no gradient
clipping, base learning rate 1.5e-4 per 256 examples (the authors scale it by
batch / 256: 2.4e-3 at batch 4096), 5 warm-up epochs then cosine decay to 0, 100
epochs of CC12M (~10M pairs: ~2,500 steps per epoch at batch 4096).

Text: the authors tokenize with BERT-base-uncased (30,522 ids); nothing downloads
here, so the default is the built-in CLIP BPE ('clip', pads with 0, as M3AE's
padding mask expects; its '!' is id 0 too and counts as padding). For BERT:
--config.data.tokenizer=hf:/path/bert-base-uncased/tokenizer.json
--config.model.text.vocab_size=30522.

Evaluation: a linear probe on the encoder's image-only [CLS] output (the authors'
`forward_representation`); zero-shot and retrieval need the optional contrastive
head, which is not part of M3AE (recipe argument `contrastive`: the head plus
'clip' at weight 1.0, with those two evaluators).

    python main.py --config=configs/m3ae_b16.py --workdir=/tmp/m3ae \
        --config.data.source=jsonl:/data/cc12m/train.jsonl \
        --config.evals.linear_probe.source=imagefolder:/data/imagenet/{split} \
        --config.evals.linear_probe.every=25000
"""
from configs import common


def get_config(arg=None):
  """`arg`: 'runlocal' for a one-minute CPU run on shapes; 'contrastive' adds the
  optional CLIP-style head, its loss and the zero-shot / retrieval evaluators."""
  arg = common.parse_arg(arg, runlocal=False, contrastive=False)
  c = common.b16_recipe()
  c.batch_size = 4096
  steps_per_epoch = 2500
  c.total_steps = 100 * steps_per_epoch

  c.model.name = "m3ae"
  c.model.image.update(variant="B/16")
  # Only vocab_size and context_length are read: the one encoder is bidirectional.
  c.model.text.update(context_length=64, causal=False)
  c.model.m3ae.update(image_mask_ratio=0.75, text_mask_ratio=0.75, decoder_width=512,
                      decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048,
                      pool="cls", contrastive=arg.contrastive)
  c.data.update(image_size=256, crop_scale=[0.2, 1.0], flip=True)

  c.objectives = {"m3ae_image": 1.0, "m3ae_text": 0.5}
  c.optim.update(lr=1.5e-4 * c.batch_size / 256, warmup_steps=5 * steps_per_epoch,
                 end_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.95, eps=1e-8,
                 grad_clip_norm=0.0)

  # Enable with --config.evals.linear_probe.every=N (0 = only at the end).
  c.evals = {"linear_probe": common.eval_entry(
      type="linear_probe", every=-1, source="imagefolder:data/imagenet/{split}",
      split="val", train_split="train", train_size=50_000, size=10_000,
      batch_size=256)}
  if arg.contrastive:
    c.objectives["clip"] = 1.0
    c.evals.retrieval = common.eval_entry(
        type="retrieval", every=-1, source="jsonl:data/val.jsonl", size=5000,
        batch_size=256)
  if not arg.runlocal:
    return c
  c = common.runlocal(c)
  c.model.m3ae.update(decoder_width=32, decoder_depth=1, decoder_heads=2,
                      decoder_mlp_dim=128)
  c.evals.linear_probe.update(split="validation", train_split="train", train_size=256,
                              size=64, steps=20)
  return c
