"""Recipe pieces the recipes in configs/ share (as big_vision's configs/common.py)."""
from vlp_jax import config as config_lib
from vlp_jax.config import ConfigDict


def eval_entry(**values) -> ConfigDict:
  """An entry of `config.evals` holding every evaluator key (so each is overridable
  from the command line), with `values` set."""
  entry = ConfigDict(config_lib.EVAL_KEYS)
  entry.update(values)
  return entry


def b16_recipe() -> ConfigDict:
  """What the ViT-B/16 recipes share: 224 px B/16 image tower, CLIP's 12 x 512 text
  tower with context 77 and 49,408 ids, data and a retrieval eval on user paths."""
  c = config_lib.default_config()
  c.log_every = 100
  c.checkpoint_every = 2000
  c.model.embed_dim = 512
  # Accelerator defaults (README "Performance"): bf16 compute with float32 params and
  # optimizer state, one fused QKV matmul. --config.model.dtype=float32 for f32.
  c.model.dtype = "bfloat16"
  c.model.fused_qkv = True
  c.model.image.update(variant="B/16")
  c.model.text.update(vocab_size=49408, width=512, depth=12, mlp_dim=2048, num_heads=8,
                      context_length=77, causal=True, pool="eos")
  c.data.update(source="jsonl:data/train.jsonl", image_size=224, tokenizer="bytes",
                normalization="clip")
  # Enable with --config.evals.retrieval.every=N (0 = only at the end).
  c.evals = {"retrieval": eval_entry(type="retrieval", every=-1,
                                     source="jsonl:data/val.jsonl", size=5000,
                                     batch_size=256)}
  return c
