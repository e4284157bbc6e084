"""Extra views of each training example: K image crops per named view group and
shortened / augmented forms of its caption (`config.data.views` / `.text_views`).

    config.data.views = {
        "global": {"count": 2, "size": 224, "crop_scale": [0.4, 1.0]},
        "local": {"count": 8, "size": 96, "crop_scale": [0.05, 0.4]},
    }
    config.data.text_views = {"short": {"kind": "first_sentence"}}

Each image view group NAME adds 'views/NAME' float32 [B, count, size, size, 3] (its
own random resized crops of the source image, optionally flipped, colour-jittered,
grey or blurred (`VIEW_DEFAULTS`), normalised like 'image') and, with
`boxes`, 'view_boxes/NAME' float32 [B, count, 4]: where each crop lies in the source
image as (x0, y0, x1, y1) in [0, 1]; output column 0 shows source x0 and the last
column x1, so a flipped crop has x0 > x1. Each text view NAME adds 'text_views/NAME'
int32 [B, L]: the tokens of a form of the row's caption ('first_sentence',
'first_words', 'word_deletion', see `TEXT_VIEW_KINDS`). The batch's 'image' and
'text' are unchanged by views; with none configured the batch is exactly as before.

Randomness: after the transform's own draws, each example draws one 63-bit view
seed from its per-example generator (seeded by grain from the seed and the element's
index), and view v of group NAME in row r uses `numpy.random.default_rng([view seed,
hash(prefix + NAME), r, v])` (`view_rng`). Views are thus a pure function of (seed,
element index, view) like the rest of the example: the pipeline's worker- and
process-count invariance, bad-record replacement and resume hold for them unchanged,
and adding a group changes no other group's views.

Imports no grain (the config checks use `check_config`).
"""
import dataclasses
import difflib
import hashlib
import math
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from vlp_jax import errors
from vlp_jax.data import decode

# Batch-key prefixes of the views (all arrays with the batch axis first).
IMAGE_PREFIX, BOX_PREFIX, TEXT_PREFIX = "views/", "view_boxes/", "text_views/"
PREFIXES = (IMAGE_PREFIX, BOX_PREFIX, TEXT_PREFIX)

# Keys of each `config.data.views` entry and their defaults ('size' 0:
# config.data.image_size). Photometric options (`photometric`; off by default):
# `color_jitter` [brightness, contrast, saturation, hue] applied with probability
# `jitter_p`, then grayscale with probability `grayscale`, Gaussian blur (sigma in
# [0.1, 2]) with probability `blur` (SimCLR / BYOL / TCL-style).
VIEW_DEFAULTS = {"count": 1, "size": 0, "crop_scale": [0.4, 1.0],
                 "crop_ratio": [3 / 4, 4 / 3], "flip": False, "boxes": False,
                 "color_jitter": [0.0, 0.0, 0.0, 0.0], "jitter_p": 0.8,
                 "grayscale": 0.0, "blur": 0.0}
# Keys of each `config.data.text_views` entry: `kind`, `words` (first_words: how many;
# first_sentence: at most this many, 0 = no cap) and `p` (word_deletion: the
# probability of deleting each word).
TEXT_VIEW_DEFAULTS = {"kind": "first_sentence", "words": 0, "p": 0.1}
TEXT_VIEW_KINDS = ("first_sentence", "first_words", "word_deletion")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class ImageView:
  """One group of `count` random resized crops of `size` px."""
  name: str
  count: int
  size: int
  crop_scale: Tuple[float, float]
  crop_ratio: Tuple[float, float]
  flip: bool = False
  boxes: bool = False
  color_jitter: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
  jitter_p: float = 0.8
  grayscale: float = 0.0
  blur: float = 0.0


@dataclasses.dataclass(frozen=True)
class TextView:
  """One form of the caption (`kind` in TEXT_VIEW_KINDS)."""
  name: str
  kind: str
  words: int = 0
  p: float = 0.1


def _entries(group, where, defaults):
  """[(name, {key: value with defaults})] of a views group; unknown keys are errors."""
  out = []
  if group is None:
    return out
  if not hasattr(group, "items"):
    raise errors.ConfigTypeError(
        f"{where} must be a group of named views (a dict / ConfigDict), got {group!r}.")
  for name, entry in sorted(group.items()):
    if not _NAME.match(str(name)):
      raise errors.ConfigError(
          f"{where}: view name {name!r} must be a letter followed by letters, digits "
          "or '_' (it becomes part of a batch key).")
    if not hasattr(entry, "items"):
      raise errors.ConfigTypeError(
          f"{where}.{name} must be a group of keys {sorted(defaults)}, got {entry!r}.")
    for key in entry.keys():
      if key not in defaults:
        match = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.5)
        hint = f" Did you mean '{match[0]}'?" if match else ""
        raise errors.ConfigKeyError(
            f"Unknown config key '{where}.{name}.{key}'.{hint} Valid keys here: "
            f"{sorted(defaults)}.")
    out.append((str(name), {**defaults, **dict(entry.items())}))
  return out


def _int(value, where, low, meaning):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise errors.ConfigError(
        f"{where}={value!r} must be an integer >= {low} ({meaning}).")
  return value


def _range(value, where, ok, meaning):
  numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
      for v in value)
  if not (numbers and value[0] <= value[1] and ok(value)):
    shown = list(value) if isinstance(value, (list, tuple)) else value
    raise errors.ConfigError(f"{where}={shown!r} is invalid: it must be {meaning}.")
  return (float(value[0]), float(value[1]))


def image_views(data_cfg) -> Tuple[ImageView, ...]:
  """The checked `config.data.views` (sorted by name); () when none."""
  out = []
  for name, e in _entries(data_cfg.get("views"), "config.data.views", VIEW_DEFAULTS):
    where = f"config.data.views.{name}"
    size = _int(e["size"], where + ".size", 0,
                "the crops' side in pixels; 0 = config.data.image_size")
    for key in ("flip", "boxes"):
      if not isinstance(e[key], bool):
        raise errors.ConfigTypeError(f"{where}.{key} must be True or False, got "
                                     f"{e[key]!r}.")
    out.append(ImageView(
        name, _int(e["count"], where + ".count", 1, "crops per example"),
        size or int(data_cfg.image_size),
        _range(e["crop_scale"], where + ".crop_scale", lambda v: 0 < v[0] and v[1] <= 1,
               "two numbers [a, b] with 0 < a <= b <= 1 (the range of the crop's area "
               "fraction of the image), e.g. [0.4, 1.0] (DINO's global crops) or "
               "[0.05, 0.4] (its local crops)"),
        _range(e["crop_ratio"], where + ".crop_ratio", lambda v: 0 < v[0],
               "two numbers [a, b] with 0 < a <= b (the range of the crop's aspect "
               "ratio w / h), e.g. [0.75, 1.3333]"),
        e["flip"], e["boxes"], _jitter(e["color_jitter"], where + ".color_jitter"),
        *(_probability(e[key], f"{where}.{key}", meaning) for key, meaning in (
            ("jitter_p", "that color_jitter is applied"),
            ("grayscale", "of turning the crop grey"),
            ("blur", "of a Gaussian blur")))))
  return tuple(out)


def _probability(value, where, meaning):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      0 <= value <= 1):
    raise errors.ConfigError(f"{where}={value!r} must be a number in [0, 1] (the "
                             f"probability {meaning}).")
  return float(value)


def _jitter(value, where):
  ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v
      for v in value) and value[3] <= 0.5
  if not ok:
    shown = list(value) if isinstance(value, (list, tuple)) else value
    raise errors.ConfigError(
        f"{where}={shown!r} is invalid: it must be four numbers [brightness, contrast, "
        "saturation, hue] >= 0 with hue <= 0.5 (factors drawn from [1 - x, 1 + x], hue "
        "shifts from [-x, x]), e.g. [0.4, 0.4, 0.2, 0.1]; zeros = off.")
  return tuple(float(v) for v in value)


def text_views(data_cfg) -> Tuple[TextView, ...]:
  """The checked `config.data.text_views` (sorted by name); () when none."""
  out = []
  for name, e in _entries(data_cfg.get("text_views"), "config.data.text_views",
                          TEXT_VIEW_DEFAULTS):
    where = f"config.data.text_views.{name}"
    if e["kind"] not in TEXT_VIEW_KINDS:
      raise errors.ConfigError(f"{where}.kind={e['kind']!r} is not one of "
                               f"{list(TEXT_VIEW_KINDS)}.")
    words = _int(e["words"], where + ".words", 1 if e["kind"] == "first_words" else 0,
                 "words kept: first_words keeps this many, first_sentence at most this "
                 "many (0 = no cap)")
    p = e["p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
      raise errors.ConfigError(f"{where}.p={p!r} must be a number in [0, 1) (the "
                               "probability that word_deletion deletes each word).")
    out.append(TextView(name, e["kind"], words, float(p)))
  return tuple(out)


def image_view_entry(**options) -> dict:
  """A `config.data.views` entry holding every key (defaults for those not given, lists
  as tuples), so each can be overridden on the command line
  (`--config.data.views.NAME.KEY=...`)."""
  return _full_entry(options, VIEW_DEFAULTS, "config.data.views entry")


def text_view_entry(**options) -> dict:
  """A `config.data.text_views` entry holding every key (see `image_view_entry`)."""
  return _full_entry(options, TEXT_VIEW_DEFAULTS, "config.data.text_views entry")


def _full_entry(options, defaults, where):
  _entries({"entry": options}, where, defaults)  # Unknown keys are errors.
  out = {**defaults, **options}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def check_config(data_cfg) -> None:
  """Raises a ConfigError / ConfigKeyError / ConfigTypeError naming the first bad
  key of `config.data.views` / `config.data.text_views`."""
  image_views(data_cfg)
  text_views(data_cfg)


def batch_shapes(data_cfg, context_length: int) -> Dict[str, Tuple[tuple, str]]:
  """{batch key: (per-row shape, dtype)} of the configured views (e.g. to build a
  synthetic batch): 'views/NAME' (count, size, size, 3) float32, 'view_boxes/NAME'
  (count, 4) float32, 'text_views/NAME' (context_length,) int32."""
  out = {}
  for v in image_views(data_cfg):
    out[IMAGE_PREFIX + v.name] = ((v.count, v.size, v.size, 3), "float32")
    if v.boxes:
      out[BOX_PREFIX + v.name] = ((v.count, 4), "float32")
  for t in text_views(data_cfg):
    out[TEXT_PREFIX + t.name] = ((context_length,), "int32")
  return out


def is_view_key(key: str) -> bool:
  return key.startswith(PREFIXES)


# --- Per-example randomness and crops.


def _name_hash(name: str) -> int:
  return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest(),
                        "little")


def view_rng(view_seed: int, name: str, row: int,
             index: int = 0) -> np.random.Generator:
  """The generator of view `index` of group `name` in row `row` of one example."""
  return np.random.default_rng([view_seed, _name_hash(name), row, index])


def random_crop_box(h: int, w: int, rng: np.random.Generator,
                    scale: Tuple[float, float], ratio: Tuple[float, float]):
  """torchvision's RandomResizedCrop box (left, top, right, bottom) in pixels: area
  fraction in `scale`, aspect ratio w / h in `ratio` (10 tries, then a ratio-clamped
  center crop)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return (left, top, left + cw, top + ch)
  in_ratio = w / h  # Fallback: center crop, aspect ratio clamped to `ratio`.
  if in_ratio < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    cw, ch = int(round(h * max(ratio))), h
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return (left, top, left + cw, top + ch)


def crop(image_u8: np.ndarray, view: ImageView, rng: np.random.Generator):
  """One random resized crop of `view` -> (uint8 [S, S, 3], float32 [4] box in [0, 1]
  as (x0, y0, x1, y1), x0 > x1 when flipped)."""
  h, w = image_u8.shape[:2]
  box = random_crop_box(h, w, rng, view.crop_scale, view.crop_ratio)
  return finish_crop(decode.Decoded(Image.fromarray(image_u8), (w, h)), view, box, rng)


def finish_crop(decoded, view: ImageView, box, rng: np.random.Generator):
  """`crop` after its box was drawn: `box` (full-resolution pixels) of a
  `decode.Decoded` image resized, flipped and photometrically augmented with the
  rest of `rng`'s draws."""
  w, h = decoded.size
  img = decoded.resize(box, view.size)
  x0, y0, x1, y1 = box[0] / w, box[1] / h, box[2] / w, box[3] / h
  if view.flip and rng.random() < 0.5:
    img, x0, x1 = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), x1, x0
  return photometric(img, view, rng), np.array([x0, y0, x1, y1], np.float32)


def _adjust_hue(img, shift):
  """torchvision's PIL hue adjustment: H channel shifted by `shift` turns (uint8)."""
  h, s, v = img.convert("HSV").split()
  h = Image.fromarray((np.asarray(h, np.int16) + int(round(shift * 255))).astype(
      np.uint8), "L")
  return Image.merge("HSV", (h, s, v)).convert("RGB")


def photometric(image_u8: np.ndarray, view: ImageView, rng: np.random.Generator):
  """`view`'s colour jitter (torchvision's ColorJitter on PIL images: the four
  adjustments in a random order), grayscale and blur, each with its probability;
  uint8 array (or RGB PIL image) in, uint8 array out. Draws nothing when all are off."""
  b, c, s, hue = view.color_jitter
  if not (any(view.color_jitter) or view.grayscale or view.blur):
    return np.asarray(image_u8)
  img = image_u8 if isinstance(image_u8, Image.Image) else Image.fromarray(image_u8)
  if any(view.color_jitter) and rng.random() < view.jitter_p:
    factor = lambda x: rng.uniform(max(0.0, 1 - x), 1 + x)
    ops = [(b, lambda im: ImageEnhance.Brightness(im).enhance(factor(b))),
           (c, lambda im: ImageEnhance.Contrast(im).enhance(factor(c))),
           (s, lambda im: ImageEnhance.Color(im).enhance(factor(s))),
           (hue, lambda im: _adjust_hue(im, rng.uniform(-hue, hue)))]
    for i in rng.permutation(4):
      if ops[i][0]:
        img = ops[i][1](img)
  if view.grayscale and rng.random() < view.grayscale:
    img = img.convert("L").convert("RGB")
  if view.blur and rng.random() < view.blur:
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  return np.asarray(img)


def plan_view_rows(w: int, h: int, views: Sequence[ImageView], view_seed: int,
                   rows: int):
  """{name: [(box, generator) per row and crop]}: each crop's box drawn from the
  full-resolution size, with the generator that draws the rest of that crop."""
  plan = {}
  for view in views:
    entries = []
    for r in range(rows):
      for i in range(view.count):
        rng = view_rng(view_seed, IMAGE_PREFIX + view.name, r, i)
        entries.append((random_crop_box(h, w, rng, view.crop_scale, view.crop_ratio),
                        rng))
    plan[view.name] = entries
  return plan


def plan_crops(views: Sequence[ImageView], plan) -> List[Tuple[tuple, int]]:
  """[(box, output size)] of every crop of a `plan_view_rows` plan."""
  return [(box, view.size) for view in views for box, _ in plan[view.name]]


def render_view_rows(decoded, views: Sequence[ImageView], plan, rows: int):
  """{name: (uint8 [rows, count, S, S, 3], float32 [rows, count, 4] boxes or None
  without `boxes`)}: every row's own crops of each view group, from a
  `decode.Decoded` image and its `plan_view_rows` plan."""
  out = {}
  for view in views:
    crops = [finish_crop(decoded, view, box, rng) for box, rng in plan[view.name]]
    images = np.stack([c[0] for c in crops]).reshape(
        (rows, view.count, view.size, view.size, 3))
    boxes = np.stack([c[1] for c in crops]).reshape((rows, view.count, 4))
    out[view.name] = (images, boxes if view.boxes else None)
  return out


# --- Text views.

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(caption: str, max_words: int = 0) -> str:
  """The caption up to its first sentence end ('.', '!' or '?' then a space), capped
  at `max_words` words (0 = no cap)."""
  head = _SENTENCE_END.split(caption.strip(), maxsplit=1)[0]
  return first_words(head, max_words) if max_words else head


def first_words(caption: str, n: int) -> str:
  """The first `n` whitespace-separated words."""
  return " ".join(caption.split()[:n])


def word_deletion(caption: str, p: float, rng: np.random.Generator) -> str:
  """Each word deleted with probability `p` (EDA's random deletion); one random word
  is kept when all would go."""
  words = caption.split()
  if not words:
    return caption
  keep = rng.random(len(words)) >= p
  if not keep.any():
    return words[int(rng.integers(len(words)))]
  return " ".join(w for w, k in zip(words, keep) if k)


def text_view(caption: str, view: TextView, rng: np.random.Generator) -> str:
  """The `view` form of `caption` (`rng` only for word_deletion)."""
  if view.kind == "first_sentence":
    return first_sentence(caption, view.words)
  if view.kind == "first_words":
    return first_words(caption, view.words)
  return word_deletion(caption, view.p, rng)


def text_view_rows(captions: Sequence[str], views: Sequence[TextView],
                   view_seed: int) -> Dict[str, List[str]]:
  """{name: [the view of each row's caption]}."""
  return {v.name: [text_view(c, v, view_rng(view_seed, TEXT_PREFIX + v.name, r))
                   for r, c in enumerate(captions)] for v in views}
