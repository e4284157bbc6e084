"""Recipe pieces the recipes in configs/ share (as big_vision's configs/common.py)."""
from vlp_jax import config as config_lib
from vlp_jax.config import ConfigDict


def eval_entry(type: str, **values) -> ConfigDict:  # pylint: disable=redefined-builtin
  """An entry of `config.evals` for evaluator `type` holding the common keys and the
  evaluator's own options with their defaults (so each is overridable from the command
  line, e.g. --config.evals.zeroshot.templates=imagenet), with `values` set. A string
  for an option whose default is a tuple becomes a one-element tuple."""
  from vlp_jax import evaluators  # pylint: disable=g-import-not-at-top
  entry = ConfigDict(evaluators.defaults(type))
  for key, value in values.items():
    if isinstance(entry.get(key), tuple) and isinstance(value, str):
      value = (value,)
    entry[key] = value  # An unknown key stays, for validation to name.
  return entry


def clip_text_pool(c: ConfigDict) -> ConfigDict:
  """CLIP's pooling for a causal text tower on CLIP's BPE ('clip'): at the highest id
  (end-of-text, 49407) with no key mask by pad id, as OpenAI / open_clip. In CLIP's
  vocabulary id 0 is both padding and '!', so 'eos' pooling with the padding mask
  would drop every '!' from attention and pool before the end token of a caption
  holding one; the causal mask keeps the trailing padding out of the pooled token."""
  c.model.text.update(pool="argmax", padding_mask=False)
  return c


def b16_recipe() -> ConfigDict:
  """What the ViT-B/16 recipes share: 224 px B/16 image tower, CLIP's 12 x 512 text
  tower with context 77 and CLIP's BPE tokenizer ('clip', built in: 49,408 ids, the
  ids of open_clip), data and a retrieval eval on user paths."""
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
  c.data.update(source="jsonl:data/train.jsonl", image_size=224, tokenizer="clip",
                normalization="clip")
  # uint8 images to the device, normalised there (README "Real data against
  # synthetic"): a third less host work per image and 4x fewer bytes copied.
  c.data.normalize_on_device = True
  # Enable with --config.evals.retrieval.every=N (0 = only at the end).
  c.evals = {"retrieval": eval_entry(type="retrieval", every=-1,
                                     source="jsonl:data/val.jsonl", size=5000,
                                     batch_size=256)}
  return c


def parse_arg(arg, **defaults) -> ConfigDict:
  """The recipe argument `NAME.py:a,b=v` as flags over `defaults` (big_vision's
  convention): a bare name sets a boolean to True. Unknown names are errors."""
  from vlp_jax import errors  # pylint: disable=g-import-not-at-top
  out = ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise errors.ConfigKeyError(
          f"Unknown recipe argument '{key}' in ':{arg}'; this recipe takes "
          f"{sorted(defaults)} (e.g. --config=configs/clip_b16.py:runlocal).")
    kind = type(defaults[key])
    out[key] = True if not eq else (value.lower() in ("1", "true", "yes")
                                    if kind is bool else kind(value))
  return out


def runlocal(c: ConfigDict) -> ConfigDict:
  """Shrinks a recipe to a run of a minute on a laptop CPU, keeping its model family,
  heads and objectives: tiny towers at 64 px on the built-in shapes data, 20 steps,
  every evaluation on shapes at the end."""
  c.batch_size, c.total_steps = 32, 20
  c.log_every, c.checkpoint_every = 5, 10
  c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # any device count
  c.model.dtype = "float32"
  c.model.embed_dim = 64
  c.model.image.update(variant="", width=64, depth=2, mlp_dim=256, num_heads=2,
                       patch_size=16)
  c.model.text.update(vocab_size=48, width=64, depth=2, mlp_dim=256, num_heads=2,
                      context_length=24)
  c.model.decoder.update(depth=min(c.model.decoder.depth, 1), num_queries=8)
  c.data.update(source="shapes", image_size=64, tokenizer="words:shapes", size=0)
  # Word tokenizers: EOS (2) is not the highest id and nothing else is 0 -> 'eos'.
  c.model.text.update(pool="eos", padding_mask=True)
  c.optim.warmup_steps = 5
  for entry in c.evals.values():
    entry.update(source="shapes", every=0, size=64, batch_size=32)
  return c


# Where the large recipes are laid out (README "Pod-scale recipes"): FSDP over the
# chips of a TPU slice (parameters, gradients and Adam moments split 1/fsdp per chip;
# the batch over data x fsdp), scanned blocks (one compiled block: compile time does
# not grow with depth) and remat of whole blocks. `tools/aot_compile.py` proves each
# fits. FSDP splits the width of every kernel, so fsdp must divide the model's widths
# (1152 (So400m) and 1664 (bigG) split at most 128 ways, 768 256 ways), and each mesh
# axis must be a product of the slice's physical axes (4x8x8: 4, 8, 32, 64, ...);
# `data` takes the rest of the slice.
def pod_layout(c: ConfigDict, remat: str = "full", data: int = 1) -> ConfigDict:
  """FSDP over all devices / `data`, scanned and rematerialised blocks (TPU slices)."""
  c.mesh = ConfigDict({"data": data, "fsdp": -1, "tensor": 1})
  c.model.update(scan_layers=True, remat=remat)
  return c


def h100x8_layout(c: ConfigDict, batch_size: int) -> ConfigDict:
  """`pod_layout`'s recipe moved to one node of 8 x H100 80 GB: FSDP over the 8 GPUs
  (NVLink), a global batch of `batch_size` (the node's), cuDNN attention. Multi-node:
  --config.mesh.data=NODES keeps FSDP within each node and splits the batch over nodes
  (scale batch_size with it). A plan, not compiled here (compiling for a GPU needs the
  GPU)."""
  c.mesh = ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
  c.batch_size = batch_size
  c.model.attention_impl = "cudnn"
  return c
