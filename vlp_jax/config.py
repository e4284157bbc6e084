"""The config schema (every known key with its default) and its validation.

Recipes in `configs/` start from `default_config()` and change values; keys that the
schema does not know are errors that name the key and the closest valid one, so typos
never silently do nothing.
"""
import difflib
import math

import ml_collections

from vlp_jax import errors, sharding

ConfigDict = ml_collections.ConfigDict

# Sub-trees whose keys are chosen by the user (names of objectives, evals, mesh axes).
OPEN_KEYS = ("objectives", "objective_cfg", "evals", "mesh", "sharding_rules")
# ... and of `config.data` (named views; `vlp_jax/data/views.py` checks their entries).
OPEN_DATA_KEYS = ("views", "text_views")

# Keys every entry of `config.evals` has, read by `train/evaluation.py`: the evaluator
# ('' = the entry's name), its period in steps (0 = only at the end, < 0 = off), the
# source ('' = config.data.source), split, examples (0 = all) and batch size. Each
# evaluator adds its own options (registered with it; `vlp_jax/evaluators/`), and
# `evaluators.check_config` checks the entries.
EVAL_COMMON_KEYS = {
    "type": "", "every": 0, "source": "", "split": "validation", "size": 0,
    "batch_size": 64,
}


# Weight formats `config.init_from.format` accepts: `vlp_jax.interop.names()`, listed
# here so that validating a config imports no format module (the registry is the
# source of truth; tests/test_interop_export.py checks the two are equal).
INIT_FROM_FORMATS = ("open_clip", "openai", "hf_clip", "hf_siglip", "big_vision",
                     "open_clip_coca")

# Keys of `config.init_from` (parameters of another run loaded into a new one).
INIT_FROM_KEYS = {
    "workdir": "",  # A run's workdir (its checkpoints/ are read) ...
    "checkpoint": "",  # ... or one checkpoint directory (workdir/checkpoints/STEP).
    "step": -1,  # With `workdir`: the step to load; -1 = latest.
    "include": [".*"],  # Regexes (full match) over '/'-joined param paths to load.
    "exclude": [],  # ... minus these (they keep their fresh initialisation).
    "allow_missing": [],  # Selected params absent from the checkpoint: init, no error.
    "allow_shape_mismatch": [],  # Selected params of another shape: init, no error.
    # Another library's weights in `checkpoint` (a file): '' = a vlp_jax checkpoint;
    # 'open_clip', 'openai', 'hf_clip', 'hf_siglip', 'big_vision', 'open_clip_coca'
    # (vlp_jax/interop/).
    "format": "",
}


# Keys of `config.teacher` (see default_config) and its momentum schedules
# (train/teacher.SCHEDULES, not imported here: it needs jax).
TEACHER_KEYS = {"params": [], "momentum": 0.996, "schedule": "constant",
                "final_momentum": 1.0}
TEACHER_SCHEDULES = ("constant", "cosine")
# Keys of `config.queue` (see default_config; vlp_jax/train/queue.py).
QUEUE_KEYS = {"size": 0, "dim": 0, "entries": {}}


def default_config() -> ConfigDict:
  """Every key the trainer understands, with defaults (a small two-tower CLIP)."""
  c = ConfigDict()
  c.seed = 0
  c.batch_size = 256
  c.accum_steps = 1  # Micro-batches per step; contrastive losses keep all negatives.
  c.total_steps = 1000
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 3

  c.model = ConfigDict()
  c.model.name = "two_tower"
  c.model.dtype = "float32"
  c.model.embed_dim = 512
  c.model.logit_scale_init = math.log(1 / 0.07)
  c.model.logit_scale_max = 100.0
  c.model.use_logit_bias = False
  c.model.logit_bias_init = 0.0
  c.model.image = ConfigDict(dict(
      variant="B/16", width=0, depth=0, mlp_dim=0, num_heads=0, patch_size=0,
      pool="cls", dropout=0.0))
  c.model.text = ConfigDict(dict(
      vocab_size=49408, width=512, depth=12, mlp_dim=2048, num_heads=8,
      context_length=77, causal=True, pool="eos", dropout=0.0))
  c.model.decoder = ConfigDict(dict(depth=0, num_queries=256))

  c.objectives = ConfigDict({"clip": 1.0})
  c.objective_cfg = ConfigDict()

  c.optim = ConfigDict(dict(
      name="adamw",  # 'adamw' or 'lamb' (layer-wise trust ratio, as FILIP).
      lr=5e-4, warmup_steps=100, end_lr_ratio=0.0, weight_decay=0.2, b1=0.9,
      b2=0.98, eps=1e-6, grad_clip_norm=1.0))

  c.data = ConfigDict(dict(
      source="shapes", size=0, image_size=224, tokenizer="bytes",
      normalization="clip", worker_count=0, prefetch=2, max_bad_fraction=0.01,
      crop_scale=[1.0, 1.0], flip=False))  # crop_scale [0.9, 1.0]: random resized crop
  # Weighted training mixture, replaces `source` when non-empty: a tuple of
  # (spec, weight) pairs or 'SPEC=WEIGHT' strings (see vlp_jax/data/mixture.py).
  c.data.mixture = ()
  c.data.shuffle_buffer = 1000  # wds: sources: samples per seeded block shuffle (0 = off)

  c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis -> mesh axes ("data,fsdp"; "" = unsharded), in priority order.
  c.sharding_rules = ConfigDict(sharding.rules_to_config())

  c.evals = ConfigDict()
  c.plot = True

  # Performance switches (README "Performance"); none changes what is computed.
  c.model.scan_layers = False  # nn.scan over blocks: params gain a leading `layers` axis.
  c.model.remat = "none"  # none|full|dots_saveable|save_qkv_proj|... (layers.REMAT_POLICIES)
  c.model.fused_qkv = False  # one (embed, 3, heads) QKV matmul in self-attention.
  # auto (cuDNN on GPU for bf16/fp16, einsum on CPU) | xla | cudnn | einsum
  c.model.attention_impl = "auto"
  c.model.image.patch_dropout = 0.0  # FLIP: fraction of patch tokens dropped in training.
  # FILIP: per-token projection width (0 = off). The model then also outputs
  # image_token_emb / text_token_emb / text_token_mask, and evaluators score with the
  # token-wise (late-interaction) similarity.
  c.model.token_embed_dim = 0
  # Masked image modelling (TIPS / SigLIP 2; vlp_jax/models/masked_outputs.py): in
  # training the image tower also runs with this fraction of patches replaced by a
  # learned mask token -> outputs masked_image_tokens, image_patch_mask (0 = off).
  c.model.masked_image_ratio = 0.0
  # Prefix conditioning (Saito et al.): learned prefix tokens per data type
  # (0 = caption, 1 = classification prompt), taken from batch['data_type'].
  c.model.text.prefix_conditioning = False
  c.model.text.prefix_length = 1  # Learned prefix vectors per data type.
  # Architecture options of pretrained checkpoints (vlp_jax/interop/): the defaults are
  # vlp_jax's own. MLP activation of both towers: gelu_tanh | gelu (exact erf, torch /
  # open_clip) | quick_gelu (OpenAI CLIP).
  c.model.mlp_act = "gelu_tanh"
  c.model.layer_norm_eps = 1e-6  # torch / open_clip / HF CLIP: 1e-5.
  c.model.image.ln_pre = False  # LayerNorm after the positions (OpenAI / open_clip ViT).
  # Visual token reduction inside the ViT (vlp_jax/models/token_reduction.py), same
  # params: method none | tome (merge r tokens per layer, ToMe's `inflect` schedule,
  # or gradually down to `target` tokens, class token included; `prop_attn`: + log
  # size on the logits) | evit (after blocks `layers` keep ceil(keep_rate (N - 1))
  # tokens by class-token attention, `fuse` the rest into one token).
  c.model.image.token_reduction = ConfigDict(dict(
      method="none", r=0, target=0, inflect=0.0, prop_attn=True, keep_rate=0.7,
      layers=(3, 6, 9), fuse=True))
  # False: no key mask from pad ids (CLIP's id 0 is also '!'; SigLIP pads with EOS).
  c.model.text.padding_mask = True
  # Pooled projections (models/heads.py): with a bias (big_vision / SigLIP `head`), or
  # none at all for a tower (SigLIP's image tower: its MAP output is the embedding).
  c.model.proj_bias = False
  c.model.image.proj = True
  c.model.text.proj = True
  # CoCa (name='coca') layout: 'vlp_jax' (two attention pools, one multimodal block
  # per layer) or 'open_clip' (open_clip's CoCa: one attentional pooler of
  # decoder.num_queries queries whose first is the contrastive one, a class token
  # appended to the text, self- and cross-attention blocks; vlp_jax/models/coca.py).
  c.model.coca_layout = "vlp_jax"
  c.model.decoder.pool_heads = 0  # 'open_clip' layout: the pooler's heads (0 = image's).
  # M3AE (name='m3ae', vlp_jax/models/m3ae.py): one encoder (sizes of model.image) over
  # [CLS] + kept patches + kept text tokens, a light decoder; mask ratios per modality;
  # pool of embed_image: 'cls' | 'gap'; contrastive: an optional CLIP-style head.
  c.model.m3ae = ConfigDict(dict(
      image_mask_ratio=0.75, text_mask_ratio=0.75, decoder_width=512, decoder_depth=8,
      decoder_heads=16, decoder_mlp_dim=2048, pool="cls", contrastive=False))
  # Rows per source example: k > 1 puts k captions of one image (each with its own
  # crop) in the batch as consecutive rows with the same batch['image_id'].
  c.data.captions_per_image = 1
  # Prompt templates turning a classification source's labels into captions:
  # 'auto' (an imagefolder's templates.txt, else the source kind's built-in set),
  # 'imagenet', 'shapes' or a .txt file of templates with '{}', one per line.
  c.data.class_templates = "auto"
  # Extra views per example (vlp_jax/data/views.py), none by default. Image view groups
  # NAME -> {count, size (0 = image_size), crop_scale, crop_ratio, flip, boxes,
  # color_jitter, jitter_p, grayscale, blur} give
  # batch['views/NAME'] [B, count, size, size, 3] (+ 'view_boxes/NAME' [B, count, 4]),
  # e.g. {'global': {'count': 2, 'size': 224, 'crop_scale': [0.4, 1.0]}, 'local':
  # {'count': 8, 'size': 96, 'crop_scale': [0.05, 0.4]}}; text views NAME -> {kind:
  # first_sentence | first_words | word_deletion, words, p} give 'text_views/NAME' [B, L].
  c.data.views = ConfigDict()
  c.data.text_views = ConfigDict()
  # PRIOR's precomputed reference probabilities (tools/prior_probs.py): a table folder
  # giving every batch 'ref_probs' [B, L] for its 'text' ('' = off; data/ref_probs.py).
  c.data.ref_probs = ""
  # Images travel to the device as uint8 and are normalised there (one jitted function
  # in TrainSetup.global_batch): 4x fewer bytes copied, no float work on the host.
  c.data.normalize_on_device = False
  c.device_prefetch = 2  # Batches put on device ahead of the running step (0 = off).
  c.profile_steps = [0, 0]  # [a, b]: jax.profiler trace of steps a..b-1 to workdir/profile.
  # JAX's persistent compilation cache (vlp_jax/compile_cache.py): 'auto' =
  # $VLP_JAX_COMPILATION_CACHE, else ~/.cache/vlp_jax/xla (shared with the tools);
  # '' = off; or a directory.
  c.compilation_cache_dir = "auto"

  # Fault tolerance (see vlp_jax/train/{nonfinite,checkpoint,init_from,freeze}.py).
  c.nonfinite = "halt"  # NaN/Inf loss or gradient: 'halt' (error) or 'skip' the update.
  c.keep_every = 0  # Also keep every checkpoint whose step is a multiple of this (0: off).
  c.best_metric = ""  # e.g. 'eval/zeroshot/top1': keep the best in checkpoints_best/.
  c.best_mode = "max"  # 'max' or 'min' for best_metric.
  c.stop_sync_every = 1  # Multi-host: agree on SIGTERM/SIGINT stops every N steps.
  c.frozen = []  # Regexes over '/'-joined param paths kept fixed (LiT: ['img/.*']).
  c.init_from = ConfigDict(INIT_FROM_KEYS)
  # Under nonfinite='skip', halt after this many consecutive skipped steps (0: never).
  c.nonfinite_max_consecutive = 10
  # Newest checkpoint incomplete or unreadable: 'fall_back' to the newest good one
  # (logged; the damaged steps move to checkpoints_damaged/) or 'stop' with an error.
  c.damaged_checkpoint = "fall_back"
  # A workdir lock whose holder is on another host and whose heartbeat is older than
  # this is taken over (on the same host: as soon as the holder's pid is gone).
  c.lock_stale_after_s = 600.0

  # Momentum (EMA) teacher (vlp_jax/train/teacher.py): an EMA copy of the parameters
  # whose '/'-joined paths fully match a regex of `params` ([] = no teacher; ['.*'] =
  # all; ['img/.*', 'img_proj/.*'] = the image tower). Objectives read its outputs as
  # 'teacher_NAME'. After each step t <- m t + (1 - m) theta, with m = `momentum`
  # ('constant') or cosine from `momentum` at step 0 to `final_momentum` at
  # total_steps ('cosine', as BYOL / DINO).
  c.teacher = ConfigDict(dict(TEACHER_KEYS, params=[]))
  # The teacher's parameters from another run (PRIOR's frozen reference model, with
  # momentum 1.0): the keys of config.init_from; include [] = config.teacher.params;
  # required: a new run without workdir/checkpoint set stops with an error.
  c.teacher.init_from = ConfigDict(dict(INIT_FROM_KEYS, include=[], required=False))
  # Memory queue (vlp_jax/train/queue.py): FIFOs of `size` rows (0 = no queue) of
  # momentum-teacher outputs, `entries` = {queue name: 'teacher_OUTPUT'}, rows of
  # dimension `dim` (0 = model.embed_dim); objectives read them as 'queue/NAME'.
  c.queue = ConfigDict(dict(QUEUE_KEYS, entries=ConfigDict({})))
  return c


def _closest(key, options):
  match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
  return f" Did you mean '{match[0]}'?" if match else ""


def check_keys(config, schema, prefix="config"):
  """Raises ConfigKeyError for the first key of `config` that `schema` lacks."""
  for key in config.keys():
    path = f"{prefix}.{key}"
    if key not in schema:
      raise errors.ConfigKeyError(
          f"Unknown config key '{path}'.{_closest(key, schema.keys())} "
          f"Valid keys here: {sorted(schema.keys())}.")
    value, ref = config[key], schema[key]
    if (key in OPEN_KEYS and prefix == "config") or (
        key in OPEN_DATA_KEYS and prefix == "config.data") or (
            path == "config.queue.entries"):  # Names chosen by the user.
      continue
    if isinstance(ref, ConfigDict):
      if not isinstance(value, (ConfigDict, dict)):
        raise errors.ConfigTypeError(
            f"'{path}' must be a group of keys, got {value!r}.")
      check_keys(value, ref, path)
    elif isinstance(ref, bool) != isinstance(value, bool) or (
        isinstance(ref, (int, float)) and not isinstance(value, (int, float))) or (
            isinstance(ref, int) and isinstance(value, float)) or (
                isinstance(ref, str) and not isinstance(value, str)):
      raise errors.ConfigTypeError(
          f"'{path}' must be of type {type(ref).__name__}, got {value!r}.")


def validate(config) -> None:
  """Checks what needs no implementation: keys, types, value ranges and cross-field
  constraints of the schema; raises with a fix-it message. `vlp_jax.validation`
  adds the checks that need the registries (models, objectives, evaluators)."""
  check_keys(config, default_config())
  if not config.objectives:
    raise errors.ConfigError(
        "config.objectives is empty: select at least one, e.g. {'clip': 1.0}.")
  for name, weight in config.objectives.items():
    if not _is_number(weight):
      raise errors.ConfigTypeError(
          f"config.objectives.{name} must be a number (its weight).")
  for name in config.objective_cfg.keys():
    if name not in config.objectives:
      raise errors.ConfigKeyError(
          f"config.objective_cfg.{name} configures an objective that is "
          f"not in config.objectives {list(config.objectives)}.")
  for key in ("batch_size", "total_steps", "log_every", "accum_steps"):
    if config[key] <= 0:
      raise errors.ConfigError(f"config.{key} must be positive, got {config[key]}.")
  check_numbers(config, "config", TOP_RANGES)
  check_numbers(config.optim, "config.optim", OPTIM_RANGES)
  if config.optim.name not in OPTIMIZER_NAMES:
    raise errors.ConfigError(
        f"config.optim.name={config.optim.name!r} is not an optimizer; use one of "
        f"{list(OPTIMIZER_NAMES)}.")
  for group in ("", ".image", ".text", ".decoder", ".m3ae"):
    node = config.model
    for key in group.split(".")[1:]:
      node = node[key]
    check_numbers(node, "config.model" + group, MODEL_RANGES[group])
  _validate_data(config.data)
  _validate_profile(config)
  validate_fault_tolerance(config)


def validate_fault_tolerance(config) -> None:
  """Checks the fault-tolerance keys (nonfinite, checkpoint policy, init_from, frozen)."""
  import re  # pylint: disable=g-import-not-at-top
  if config.nonfinite not in ("halt", "skip"):
    raise errors.ConfigError(f"config.nonfinite must be 'halt' or 'skip', got "
                             f"{config.nonfinite!r}.")
  if config.nonfinite_max_consecutive < 0:
    raise errors.ConfigError(
        "config.nonfinite_max_consecutive must be >= 0 (0: skip without bound), got "
        f"{config.nonfinite_max_consecutive}.")
  if config.damaged_checkpoint not in ("fall_back", "stop"):
    raise errors.ConfigError("config.damaged_checkpoint must be 'fall_back' or 'stop', "
                             f"got {config.damaged_checkpoint!r}.")
  if not config.lock_stale_after_s > 0:
    raise errors.ConfigError("config.lock_stale_after_s must be > 0 (seconds), got "
                             f"{config.lock_stale_after_s}.")
  if config.keep_every < 0 or config.keep_checkpoints <= 0:
    raise errors.ConfigError(
        "config.keep_every must be >= 0 and config.keep_checkpoints > 0, "
        f"got {config.keep_every} and {config.keep_checkpoints}.")
  if config.stop_sync_every <= 0:
    raise errors.ConfigError(f"config.stop_sync_every must be positive, got "
                             f"{config.stop_sync_every}.")
  if config.best_mode not in ("max", "min"):
    raise errors.ConfigError(
        f"config.best_mode must be 'max' or 'min', got {config.best_mode!r}.")
  if config.best_metric and not config.best_metric.startswith("eval/"):
    raise errors.ConfigError(
        f"config.best_metric={config.best_metric!r} must name an evaluation "
        "metric 'eval/NAME/METRIC', e.g. 'eval/zeroshot/top1'.")
  if config.best_metric:
    name = config.best_metric.split("/")[1]
    if name not in config.evals or config.evals[name].get("every", 0) < 0:
      raise errors.ConfigError(
          f"config.best_metric={config.best_metric!r} needs the evaluator "
          f"'{name}' enabled in config.evals (have {list(config.evals)}).")
  init = config.init_from
  if init.workdir and init.checkpoint:
    raise errors.ConfigError(
        "config.init_from: set either 'workdir' or 'checkpoint', not both.")
  if init.format and init.format not in INIT_FROM_FORMATS:
    raise errors.ConfigError(
        f"config.init_from.format={init.format!r} is not one of {list(INIT_FROM_FORMATS)} "
        "('' = a vlp_jax checkpoint).")
  if init.format and not init.checkpoint:
    raise errors.ConfigError(
        f"config.init_from.format={init.format!r} reads the file named by "
        "config.init_from.checkpoint; set it to the weights' path (not workdir).")
  for key in ("include", "exclude", "allow_missing", "allow_shape_mismatch"):
    _check_regexes(init[key], f"config.init_from.{key}", re)
  _check_regexes(config.frozen, "config.frozen", re)
  validate_teacher(config.teacher)
  validate_queue(config.queue)


def validate_queue(q) -> None:
  """Checks `config.queue`'s size and dimension."""
  for key in ("size", "dim"):
    if not (isinstance(q[key], int) and q[key] >= 0):
      raise errors.ConfigError(
          f"config.queue.{key}={q[key]!r} must be an integer >= 0 (size: rows per "
          "queue, e.g. 65536, 0 = no queue; dim: 0 = config.model.embed_dim).")


def validate_teacher(t) -> None:
  """Checks `config.teacher` (its regexes, momenta and schedule)."""
  import re  # pylint: disable=g-import-not-at-top
  _check_regexes(t.params, "config.teacher.params", re)
  for key in ("momentum", "final_momentum"):
    if not (_is_number(t[key]) and 0.0 <= t[key] <= 1.0):
      raise errors.ConfigError(
          f"config.teacher.{key}={t[key]!r} must be a number in [0, 1] (the teacher "
          "keeps this fraction of itself each step, e.g. 0.996; 1 = never moves).")
  if t.schedule not in TEACHER_SCHEDULES:
    raise errors.ConfigError(
        f"config.teacher.schedule={t.schedule!r} is not one of "
        f"{list(TEACHER_SCHEDULES)} ('constant': momentum throughout; 'cosine': from "
        "momentum to final_momentum over total_steps).")
  init = t.get("init_from")
  if init is not None and (init.workdir or init.checkpoint):
    if init.workdir and init.checkpoint:
      raise errors.ConfigError(
          "config.teacher.init_from: set either 'workdir' or 'checkpoint', not both.")
    if not list(t.params):
      raise errors.ConfigError(
          "config.teacher.init_from names a checkpoint but config.teacher.params is "
          "empty (no teacher): select the parameters the teacher holds, e.g. "
          "['txt/.*', 'decoder/.*', 'vocab_proj/.*'].")
    if init.format and init.format not in INIT_FROM_FORMATS:
      raise errors.ConfigError(
          f"config.teacher.init_from.format={init.format!r} is not one of "
          f"{list(INIT_FROM_FORMATS)} ('' = a vlp_jax checkpoint).")
    for key in ("include", "exclude", "allow_missing", "allow_shape_mismatch"):
      _check_regexes(init[key], f"config.teacher.init_from.{key}", re)


def _check_regexes(value, where, re):
  if isinstance(value, str) or not all(isinstance(r, str) for r in value):
    raise errors.ConfigTypeError(f"{where} must be a list of regex strings, got {value!r}.")
  for r in value:
    try:
      re.compile(r)
    except re.error as e:
      raise errors.ConfigError(f"{where}: invalid regex {r!r}: {e}.") from None


# Valid values of numeric keys: key -> (integer?, test, what is valid, what it means).
# Every value must also be a finite number. Keys whose negative values mean 'off'
# (config.evals.*.every, config.mesh.*, init_from.step) are not listed.
_GE0, _GE1 = (lambda v: v >= 0), (lambda v: v >= 1)
_UNIT, _UNIT_OPEN = (lambda v: 0 <= v <= 1), (lambda v: 0 <= v < 1)

OPTIM_RANGES = {
    "lr": (False, _GE0, ">= 0", "the peak learning rate of the warmup + cosine "
           "schedule, e.g. 5e-4; a negative lr would do gradient ascent"),
    "warmup_steps": (True, _GE0, ">= 0", "steps of linear warmup from 0 to lr; 0 = none"),
    "end_lr_ratio": (False, _UNIT, "in [0, 1]",
                     "the final learning rate as a fraction of lr, reached at the end "
                     "of the cosine decay"),
    "weight_decay": (False, _GE0, ">= 0",
                     "AdamW's decoupled weight decay on kernels; 0 = none"),
    "b1": (False, _UNIT_OPEN, "in [0, 1)", "Adam's first-moment decay rate, e.g. 0.9"),
    "b2": (False, _UNIT_OPEN, "in [0, 1)",
           "Adam's second-moment decay rate, e.g. 0.98 or 0.999"),
    "eps": (False, _GE0, ">= 0", "Adam's epsilon added to the denominator, e.g. 1e-6"),
    "grad_clip_norm": (False, _GE0, ">= 0",
                       "the global gradient norm gradients are clipped to; 0 = no "
                       "clipping"),
}
DATA_RANGES = {
    "image_size": (True, _GE1, ">= 1",
                   "the side in pixels of the square images the model sees, e.g. 224"),
    "size": (True, _GE0, ">= 0", "records used of each source; 0 = all"),
    "prefetch": (True, _GE0, ">= 0", "batches prefetched by the data pipeline"),
    "worker_count": (True, _GE0, ">= 0", "grain worker processes; 0 = in-process"),
    "shuffle_buffer": (True, _GE0, ">= 0",
                       "samples per seeded block shuffle of wds: sources; 0 = off"),
    "captions_per_image": (True, _GE1, ">= 1",
                           "batch rows (captions, each with its own crop) per source "
                           "example; 1 = one random caption"),
    "max_bad_fraction": (False, _UNIT, "in [0, 1]",
                         "the fraction of unreadable records tolerated before the run "
                         "stops; 0 = none"),
}
TOP_RANGES = {
    "checkpoint_every": (True, _GE0, ">= 0",
                         "steps between checkpoints; 0 = only at the end"),
    "device_prefetch": (True, _GE0, ">= 0",
                        "batches put on device ahead of the running step; 0 = off"),
}
_DIM = (True, _GE1, ">= 1", "a model dimension")
_FROM_VARIANT = (True, _GE0, ">= 0", "0 = taken from config.model.image.variant")
_DROPOUT = (False, _UNIT_OPEN, "in [0, 1)", "a dropout rate")
MODEL_RANGES = {
    "": {"embed_dim": _DIM,
         "token_embed_dim": (True, _GE0, ">= 0",
                             "the FILIP per-token embedding width; 0 = no token "
                             "embeddings"),
         "logit_scale_max": (False, lambda v: v > 0, "> 0",
                             "the largest value the learned logit scale may reach"),
         "masked_image_ratio": (False, _UNIT_OPEN, "in [0, 1)",
                                "the fraction of patches masked in the masked image "
                                "pass; 0 = off")},
    ".image": {"width": _FROM_VARIANT, "depth": _FROM_VARIANT, "mlp_dim": _FROM_VARIANT,
               "num_heads": _FROM_VARIANT, "patch_size": _FROM_VARIANT,
               "dropout": _DROPOUT},
    ".text": {"vocab_size": _DIM, "width": _DIM, "depth": (True, _GE0, ">= 0", "layers"),
              "mlp_dim": _DIM, "num_heads": _DIM,
              "context_length": (True, lambda v: v >= 2, ">= 2",
                                 "text tokens per caption, BOS and EOS included"),
              "dropout": _DROPOUT,
              "prefix_length": (True, _GE1, ">= 1",
                                "learned prefix vectors per data type")},
    ".decoder": {"depth": (True, _GE0, ">= 0", "multimodal decoder layers"),
                 "num_queries": (True, _GE1, ">= 1",
                                 "image tokens the decoder cross-attends to"),
                 "pool_heads": (True, _GE0, ">= 0", "the open_clip CoCa pooler's "
                                "attention heads; 0 = the image tower's")},
}
MODEL_RANGES[".m3ae"] = {
    "image_mask_ratio": (False, _UNIT_OPEN, "in [0, 1)", "the fraction of patches masked"),
    "text_mask_ratio": (False, _UNIT_OPEN, "in [0, 1)",
                        "the fraction of text positions masked"),
    "decoder_width": _DIM, "decoder_depth": (True, _GE0, ">= 0", "decoder layers"),
    "decoder_heads": _DIM, "decoder_mlp_dim": _DIM,
}
EVAL_RANGES = {  # Of EVAL_COMMON_KEYS; an evaluator checks its own options.
    "batch_size": (True, _GE1, ">= 1", "examples per evaluation batch"),
    "size": (True, _GE0, ">= 0", "examples evaluated; 0 = all"),
}
# train/optim.OPTIMIZERS (not imported here: it needs optax).
OPTIMIZER_NAMES = ("adamw", "lamb")
# transforms.NORMALIZATIONS (not imported here: it needs grain).
NORMALIZATIONS = ("clip", "inception", "unit")


def _is_number(value, integer=False) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return isinstance(value, int) if integer else True


def check_numbers(node, prefix, ranges):
  """Raises ConfigTypeError / ConfigError naming the key, its value and what is valid
  for the first key of `node` outside its range in `ranges`."""
  for key, (integer, ok, valid, meaning) in ranges.items():
    if key not in node:
      continue
    value = node[key]
    kind = "an integer" if integer else "a number"
    if not _is_number(value, integer):
      raise errors.ConfigTypeError(
          f"{prefix}.{key}={value!r} must be {kind} {valid} ({meaning}).")
    if not (math.isfinite(value) and ok(value)):
      raise errors.ConfigError(
          f"{prefix}.{key}={value!r} is invalid: it must be "
          f"{kind if integer else 'a finite number'} {valid} ({meaning}).")


def _validate_data(d):
  check_numbers(d, "config.data", DATA_RANGES)
  scale = d.crop_scale
  if isinstance(scale, str) or not hasattr(scale, "__len__") or len(scale) != 2 or (
      not all(_is_number(v) for v in scale)) or not (
          0 < scale[0] <= scale[1] <= 1):
    raise errors.ConfigError(
        f"config.data.crop_scale={_lists(scale)!r} is invalid: it must be two numbers "
        "[a, b] with 0 < a <= b <= 1 (the range of the area fraction of a random "
        "resized crop; [1.0, 1.0] = plain resize and center crop), e.g. [0.9, 1.0].")
  if d.normalization not in NORMALIZATIONS:
    raise errors.ConfigError(
        f"config.data.normalization={d.normalization!r} is not one of "
        f"{list(NORMALIZATIONS)}.")
  from vlp_jax.data import views  # pylint: disable=g-import-not-at-top
  views.check_config(d)


def _lists(value):
  if isinstance(value, dict):
    return {k: _lists(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_lists(v) for v in value]
  return value


# layers.MLP_ACTIVATIONS, text.TEXT_POOLS and coca.COCA_LAYOUTS (not imported here:
# they need jax).
MLP_ACTS = ("gelu_tanh", "gelu", "quick_gelu")
TEXT_POOLS = ("eos", "first", "mean", "argmax", "last")
COCA_LAYOUTS = ("vlp_jax", "open_clip")


def _validate_model_options(m):
  if m.mlp_act not in MLP_ACTS:
    raise errors.ConfigError(f"config.model.mlp_act={m.mlp_act!r} is not one of "
                             f"{list(MLP_ACTS)}.")
  if not (_is_number(m.layer_norm_eps) and 0 < m.layer_norm_eps < 1):
    raise errors.ConfigError(f"config.model.layer_norm_eps={m.layer_norm_eps!r} must be "
                             "in (0, 1), e.g. 1e-6 (flax) or 1e-5 (torch / open_clip).")
  if m.text.pool not in TEXT_POOLS:
    raise errors.ConfigError(f"config.model.text.pool={m.text.pool!r} is not one of "
                             f"{list(TEXT_POOLS)}.")
  if m.m3ae.pool not in ("cls", "gap"):
    raise errors.ConfigError(f"config.model.m3ae.pool={m.m3ae.pool!r} is not one of "
                             "['cls', 'gap'].")
  layout = m.get("coca_layout", "vlp_jax")
  if layout not in COCA_LAYOUTS:
    raise errors.ConfigError(f"config.model.coca_layout={layout!r} is not one "
                             f"of {list(COCA_LAYOUTS)}.")
  if m.name == "coca" and layout == "open_clip" and (
      m.embed_dim != m.text.width or m.decoder.num_queries < 2):
    raise errors.ConfigError(
        "config.model.coca_layout='open_clip' needs config.model.embed_dim == "
        f"config.model.text.width (got {m.embed_dim} and {m.text.width}: the pooled "
        "image queries are the decoder's context) and config.model.decoder.num_queries "
        f">= 2 (got {m.decoder.num_queries}: query 0 is the contrastive one).")
  heads = m.decoder.get("pool_heads", 0)
  if m.name == "coca" and layout == "open_clip" and heads and m.embed_dim % heads:
    raise errors.ConfigError(
        f"config.model.decoder.pool_heads={heads} does not divide config.model.embed_dim"
        f"={m.embed_dim} (the open_clip CoCa pooler's width).")


def _validate_profile(config):
  _validate_model_options(config.model)
  if not 0.0 <= config.model.image.patch_dropout < 1.0:
    raise errors.ConfigError(
        f"config.model.image.patch_dropout={config.model.image.patch_dropout} must be "
        "in [0, 1) (the fraction of patch tokens dropped in training).")
  steps = list(config.profile_steps)
  if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or (
      steps != [0, 0] and not 0 <= steps[0] < steps[1]):
    raise errors.ConfigError(f"config.profile_steps={steps} must be [a, b] with 0 <= a < b "
                             "(trace steps a..b-1), or [0, 0] for no profile.")


def to_dict(config):
  """Plain nested dict of JSON types (for config.json): tuples become lists."""
  return _lists(config.to_dict())
