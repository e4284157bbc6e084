"""Model FLOPs the multi-view / teacher methods add to a training step, beyond the
family's forward pass over batch['image'] and batch['text'] (`flops.py`).

Counted, per sample, in multiply-adds already weighted by passes (a pass with
gradient counts 3 x forward, a pass without counts 1 x), only where something reads
the output (XLA removes what nothing reads):

* 'views': the student's image tower on each view group whose outputs an objective
  reads (count crops at the group's size, token projections included when read), and
  its text tower on each text view read;
* 'teacher': the momentum teacher's forward pass (no gradient) over the inputs whose
  teacher outputs an objective or the queue reads: image, text and view groups;
* 'masked': the student's second image pass with masked patches (TIPS / SigLIP 2,
  `models/masked_outputs.py`), when its output is read. Its patches are all kept
  (patch dropout is off there).

CoCa's text-only decoder pass ('text_lm_logits': the multimodal layers without
cross-attention and the vocabulary projection, over the unimodal text features) is
counted where it is read: under 'teacher' (1 x forward) for 'teacher_text_lm_logits'
(PRIOR's frozen reference), under 'views' (3 x: another student pass) for
'text_lm_logits' (the reference model's own training, 'text_lm'). The family's count
of its own forward pass is not reduced where nothing reads the image (the reference
model's recipe): its MFU is then an over-estimate of the work done.

Outputs read only by the momentum teacher need no student pass, so a view that only
the teacher sees (TCL's momentum view) costs one teacher forward, not three. An
objective that starts late (SigLIP 2's, registered `starts_at`) adds its work only
from its start: the train step skips it before (`train/step.phased`).
"""
import copy
from typing import Dict, Iterable

from vlp_jax import models
from vlp_jax.models import builders, macs, view_outputs
from vlp_jax.train import teacher as teacher_lib

def _reads(config, step=None) -> set:
  """Every model output the objectives (those on at `step`; None: all) and the queue
  read (teacher ones prefixed)."""
  from vlp_jax.objectives import combine  # pylint: disable=g-import-not-at-top
  names = set()
  for obj in combine.from_config(config):
    if step is None or obj.starts_at <= step:
      names.update(obj.reads)
  queue = config.get("queue")
  if queue is not None and int(queue.size) > 0:
    names.update(queue.entries.values())
  return names


def _image_tower(config, size: int, train: bool, local: bool) -> int:
  """One crop of `size` px through `embed_image` (+ the per-token projection)."""
  c = copy.deepcopy(config)
  c.data.image_size = size
  n = macs.vit_output_tokens(c.model.image, macs.image_tokens(c.model, size, train))
  total = models.tower_macs(c, "image", train)
  if local:
    width = builders.tower_kwargs(c.model.image, None)["width"]
    total += n * width * c.model.embed_dim
  return total


def _outputs_of(reads: Iterable[str], teacher: bool):
  """The model output names the teacher (`teacher`) or the student reads, without
  the teacher prefix."""
  return [teacher_lib.student_name(r) for r in reads
          if teacher_lib.is_teacher_output(r) == teacher]


def _image_inputs(reads: Iterable[str], teacher: bool) -> Dict[str, bool]:
  """{'image' or 'views/NAME': whether its local (per-token) projection is read} for
  the image inputs the (teacher or student) outputs in `reads` need."""
  out = {}
  for name in _outputs_of(reads, teacher):
    group = view_outputs.view_group(name)
    if group and group[0] == "views":
      key = "views/" + group[1]
      out[key] = out.get(key, False) or name.startswith(view_outputs.VIEW_LOCAL)
    elif name.startswith("image_"):
      out["image"] = out.get("image", False) or name == "image_local_emb"
  return out


def _text_inputs(reads: Iterable[str], teacher: bool) -> set:
  """The text inputs ('text', 'text_views/NAME') the outputs in `reads` need."""
  out = set()
  for name in _outputs_of(reads, teacher):
    group = view_outputs.view_group(name)
    if group and group[0] == "text_views":
      out.add("text_views/" + group[1])
    elif name.startswith("text_"):
      out.add("text")
  return out


def text_lm_macs(config) -> int:
  """Per-sample forward multiply-adds of CoCa's text-only decoder pass (the
  multimodal layers with cross-attention skipped, and the vocabulary projection).
  Both layouts: one self-attention block per layer (open_clip's `MultimodalLayer`
  returns before its cross block, cross MLP included, when there is no context)."""
  m = config.model
  t = m.text
  length = t.context_length
  layer = macs.block_macs(length, t.width, t.mlp_dim)
  return m.decoder.depth * layer + length * t.width * t.vocab_size


def extra_train_macs(config, step=None) -> Dict[str, int]:
  """{'views', 'teacher', 'masked'}: per-sample multiply-adds (pass-weighted) the
  method adds to the family's `forward_macs` (see the module docstring) at `step`
  (objectives that start late add nothing before; None: every objective on)."""
  if config.model.name not in ("two_tower", "coca"):
    return {"views": 0, "teacher": 0, "masked": 0}
  reads = _reads(config, step)
  views = dict(config.data.get("views") or {})
  size_of = lambda key: (int(views[key[6:]].get("size", 0)) or config.data.image_size)
  count_of = lambda key: int(views[key[6:]].get("count", 1))
  text = models.tower_macs(config, "text", True)

  student = 0
  for key, local in _image_inputs(reads, teacher=False).items():
    if key != "image":  # The main image is the family's own forward pass.
      student += 3 * count_of(key) * _image_tower(config, size_of(key), True, local)
  student += 3 * text * len(_text_inputs(reads, False) - {"text"})
  if "text_lm_logits" in _outputs_of(reads, teacher=False):
    student += 3 * text_lm_macs(config)

  teacher = 0
  for key, local in _image_inputs(reads, teacher=True).items():
    if key == "image":
      teacher += _image_tower(config, config.data.image_size, False, local)
    else:
      teacher += count_of(key) * _image_tower(config, size_of(key), False, local)
  teacher += models.tower_macs(config, "text", False) * len(_text_inputs(reads, True))
  teacher_text = [n for n in _outputs_of(reads, teacher=True) if n.startswith("text_")]
  if "text_lm_logits" in teacher_text:
    teacher += text_lm_macs(config)
    if teacher_text == ["text_lm_logits"]:  # The text features only: no projection.
      teacher -= config.model.text.width * config.model.embed_dim

  masked = 0
  if float(config.model.get("masked_image_ratio", 0.0) or 0.0) > 0 and (
      "masked_image_tokens" in reads):
    masked = 3 * _image_tower(config, config.data.image_size, False, False)
  return {"views": student, "teacher": teacher, "masked": masked}
