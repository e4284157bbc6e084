"""Procedurally generated "shapes" image-text dataset for demos and tests.

Each example is a light, slightly noisy background with one or two coloured shapes,
plus several lowercase captions naming colour, shape, size and position. Examples
are a pure function of (seed, split, index), so the source needs no files and any
index can be rendered on demand by any worker.

Zero-shot classes are the 24 "<color> <shape>" pairs (`CLASS_NAMES`); the label of an
example with exactly one shape is `color_index * len(SHAPES) + shape_index`, else -1.
Non-train splits always contain exactly one shape so every label is defined.

Specs (`config.data.source`, an evaluator's `source`): the part after 'shapes:' is a
list of options separated by ',' or '+' ('shapes:hard+classes' is the same as
'shapes:hard,classes' and needs no quoting in --config.data.mixture=SPEC=WEIGHT).

  shapes               the demo data above (the demo's numbers and checkpoints rely on
                       it staying exactly as it is)
  shapes:hard          a harder benchmark (below) on which a tiny CLIP trained for a
                       few CPU minutes stays well below the ceiling
  shapes:classes       classification view of either ('shapes:hard,classes'): one
  shapes:hard,classes  object per image, text = its class name, label = class index,
                       `classification = True` (training turns labels into prompt
                       captions); its train split is another index stream than the
                       caption view's, its evaluation splits are the same images
  shapes:hard,noisy=0.3  either caption view with the captions of a seeded 30% of
                       the train split's records shuffled among them
                       (`caption_noise.py`; for curation experiments: the source's
                       `corrupted` says which); the other splits stay clean

`shapes:hard` (`HardShapesSource`; tokenizer `words:shapes_hard`, zero-shot templates
'shapes'): 8 colours (`HARD_COLOR_NAMES`) x 8 shapes (`HARD_SHAPES`, with near pairs
such as hexagon/circle and diamond/square, 16-28 px on a 64 px image) = 64 classes
(`HARD_CLASS_NAMES`, label `color_index * 8 + shape_index`). Each object also has a
fill (solid 1/2, outlined 1/4, striped 1/4), a size and a position (a quadrant; the
centre too when alone); images carry grey clutter strokes, random lighting and
stronger noise. Train images hold 1-3 objects (50/35/15 %) whose captions name every
object and a relation between two ("a red circle left of a blue star"): words alone
do not say which colour goes with which shape. The 8 pairs of `HELD_OUT` (one per
colour and per shape) never appear in train images or captions (compositional
generalisation). What is hard: colour is learnt at once; the shape is what a small
model needs steps and a large batch for (same-colour negatives: at batch 64 a tiny
CLIP learns no shape in 300 steps), then the held-out pairs, the fills and binding.
Splits:

  train       1-3 objects, held-out pairs excluded (label: the class with one object,
              else -1)
  validation  one object, seen pairs only (56 of the 64 classes)
  test        one object, all 64 classes uniformly (1 in 8 held out): the benchmark
  heldout     one object, held-out pairs only (zero-shot over all 64 classes)
  relations   two objects, label -1, for retrieval: examples 2k and 2k+1 are the same
              layout with the two colours swapped, so their captions hold the same
              words in another order (a bag of words cannot tell them apart)
"""
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from vlp_jax import errors
from vlp_jax.registry import SOURCES

COLORS: Dict[str, Sequence[int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 15),
    "purple": (135, 40, 175),
    "orange": (245, 125, 10),
}
COLOR_NAMES: List[str] = list(COLORS)
SHAPES: List[str] = ["circle", "square", "triangle", "cross"]
SIZES: List[str] = ["small", "large"]
POSITIONS: List[str] = [
    "top left", "top right", "bottom left", "bottom right", "center"]

CLASS_NAMES: List[str] = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]

# The words of the zero-shot evaluator's 'shapes' prompt templates
# (vlp_jax/data/templates.py): `vocabulary()` (the `words:shapes` tokenizer) covers
# them as well as the captions'.
_PROMPT_WORDS: List[str] = ["a", "photo", "of", "on", "plain", "background", "an", "image",
                            "showing", "picture", "simple", "drawing", "."]

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 1_000_000, "validation": 2_400, "test": 2_400}

# Side length as a fraction of the image side, and anchor centres as fractions.
_SIZE_RANGES = {"small": (0.20, 0.30), "large": (0.45, 0.60)}
_ANCHORS = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
_CORNERS = POSITIONS[:4]
_SUPERSAMPLE = 2  # Render at 2x and box-downsample for cheap anti-aliasing.
_COLOR_JITTER = 10
_NOISE = 6
_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

# Caption templates; fields: color, shape, size, position.
_FULL_TEMPLATES = [
    "a {size} {color} {shape} in the {position}",
    "a photo of a {size} {color} {shape} in the {position}.",
    "there is a {size} {color} {shape} in the {position}.",
    "an image of a {size} {color} {shape} in the {position} on a plain background.",
]
_SHORT_TEMPLATES = [
    "a {color} {shape}",
    "a photo of a {color} {shape}.",
    "a picture of a {size} {color} {shape}.",
    "a {color} {shape} in the {position} of the image",
    "a {size} {color} {shape}",
    "an image showing a {color} {shape}.",
]
# Fields for two shapes: c1 s1 z1 p1 (first shape), c2 s2 z2 p2 (second shape).
_TWO_TEMPLATES = [
    "a {c1} {s1} and a {c2} {s2}",
    "a photo of a {c1} {s1} and a {c2} {s2}.",
    "a {z1} {c1} {s1} in the {p1} and a {z2} {c2} {s2} in the {p2}",
    "two shapes: a {c1} {s1} and a {c2} {s2}.",
    "a picture of a {c1} {s1} in the {p1} and a {c2} {s2} in the {p2}.",
    "an image with a {c2} {s2} and a {c1} {s1}.",
]


class ShapesSource:
  """Random-access source of procedurally rendered shape images with captions.

  Args:
    split: "train", "validation" or "test"; splits are independent random streams.
    size: number of examples; None picks a per-split default (train: 1M).
    seed: global seed; together with split and index it fixes each example.
    image_size: output height and width in pixels.
    max_shapes: 1 or 2 (larger values act as 2); only used by the train split.
  """

  def __init__(self, split: str = "train", size: Optional[int] = None,
               seed: int = 0, image_size: int = 64, max_shapes: int = 2):
    if split not in SPLIT_IDS:
      raise errors.ConfigError(
          f"Unknown shapes split '{split}'; use one of {list(SPLIT_IDS)}.")
    if image_size < 16:
      raise errors.ConfigError(f"The shapes source needs image_size >= 16 "
                               f"(config.data.image_size), got {image_size}.")
    if max_shapes < 1:
      raise errors.ConfigError(f"max_shapes must be >= 1, got {max_shapes}.")
    self.split = split
    self.size = DEFAULT_SIZES[split] if size is None else int(size)
    if self.size < 0:
      raise errors.ConfigError(f"size must be >= 0, got {size}.")
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.max_shapes = 1 if split != "train" else min(int(max_shapes), 2)

  def __len__(self) -> int:
    return self.size

  @property
  def class_names(self) -> List[str]:
    """Zero-shot class names (single-shape examples carry their index as 'label')."""
    return list(CLASS_NAMES)

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"image_size={self.image_size}, max_shapes={self.max_shapes})")

  def _entropy(self, index: int) -> List[int]:
    return [self.seed, SPLIT_IDS[self.split], index]

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}.")
    rng = np.random.default_rng(np.random.SeedSequence(self._entropy(index)))
    two = self.max_shapes >= 2 and rng.random() >= 0.7
    objs = _sample_two(rng) if two else [_sample_one(rng)]
    image = _render(rng, objs, self.image_size)
    if two:
      text = _two_captions(rng, objs)
      keywords = list(dict.fromkeys([o["color"] for o in objs] +
                                    [o["shape"] for o in objs]))
      label = -1
    else:
      text = _one_captions(rng, objs[0])
      keywords = [objs[0]["color"], objs[0]["shape"]]
      label = (COLOR_NAMES.index(objs[0]["color"]) * len(SHAPES)
               + SHAPES.index(objs[0]["shape"]))
    return {"image": image, "text": text, "label": label, "keywords": keywords,
            "key": f"shapes/{self.split}/{index}"}


def _sample_one(rng: np.random.Generator) -> Dict[str, str]:
  return {"color": COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
          "shape": SHAPES[rng.integers(len(SHAPES))],
          "size": SIZES[rng.integers(len(SIZES))],
          "position": POSITIONS[rng.integers(len(POSITIONS))]}


def _sample_two(rng: np.random.Generator) -> List[Dict[str, str]]:
  """Two small shapes in different corners with different (color, shape) pairs."""
  pairs = rng.choice(len(CLASS_NAMES), size=2, replace=False)
  corners = rng.choice(len(_CORNERS), size=2, replace=False)
  objs = []
  for pair, corner in zip(pairs, corners):
    color, shape = CLASS_NAMES[pair].split(" ")
    objs.append({"color": color, "shape": shape, "size": "small",
                 "position": _CORNERS[corner]})
  return objs


def _render(rng: np.random.Generator, objs, image_size: int) -> np.ndarray:
  """Draws `objs` on a light neutral background and returns uint8 [H, W, 3]."""
  ss = _SUPERSAMPLE
  side = image_size * ss
  grey = int(rng.integers(195, 246))
  bg = tuple(int(v) for v in np.clip(grey + rng.integers(-8, 9, size=3), 0, 255))
  img = Image.new("RGB", (side, side), bg)
  draw = ImageDraw.Draw(img)
  jitter = max(1, image_size // 20) * ss
  for obj in objs:
    lo, hi = _SIZE_RANGES[obj["size"]]
    extent = rng.uniform(lo, hi) * side
    ax, ay = _ANCHORS[obj["position"]]
    half = extent / 2
    dx, dy = rng.integers(-jitter, jitter + 1, size=2)
    cx = float(np.clip(ax * side + dx, half + ss, side - ss - half))
    cy = float(np.clip(ay * side + dy, half + ss, side - ss - half))
    base = np.asarray(COLORS[obj["color"]])
    color = tuple(int(v) for v in np.clip(
        base + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3), 0, 255))
    _draw_shape(draw, obj["shape"], cx, cy, half, color)
  if ss > 1:
    img = img.reduce(ss)
  arr = np.asarray(img, dtype=np.int16)
  noise = rng.integers(-_NOISE, _NOISE + 1, size=arr.shape, dtype=np.int16)
  return np.clip(arr + noise, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float,
                half: float, color) -> None:
  """Draws a filled `shape` whose bounding box is centred at (cx, cy)."""
  x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=color)
  elif shape == "square":
    h = half * 0.85  # Same visual weight as the circle.
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
  elif shape == "cross":
    t = half / 3
    draw.rectangle((x0, cy - t, x1, cy + t), fill=color)
    draw.rectangle((cx - t, y0, cx + t, y1), fill=color)
  else:
    raise ValueError(f"Unknown shape '{shape}'.")


def _one_captions(rng: np.random.Generator, obj: Dict[str, str]) -> List[str]:
  """3-5 distinct captions; the first always names size and position."""
  n = int(rng.integers(3, 6))
  first = _FULL_TEMPLATES[rng.integers(len(_FULL_TEMPLATES))]
  rest = [t for t in _FULL_TEMPLATES + _SHORT_TEMPLATES if t != first]
  picks = [first] + [rest[j] for j in rng.choice(len(rest), size=n - 1, replace=False)]
  return [_articles(t.format(**obj)) for t in picks]


def _two_captions(rng: np.random.Generator, objs) -> List[str]:
  n = int(rng.integers(3, 6))
  a, b = objs
  fields = {"c1": a["color"], "s1": a["shape"], "z1": a["size"], "p1": a["position"],
            "c2": b["color"], "s2": b["shape"], "z2": b["size"], "p2": b["position"]}
  picks = rng.choice(len(_TWO_TEMPLATES), size=n, replace=False)
  return [_articles(_TWO_TEMPLATES[j].format(**fields)) for j in picks]


def _articles(text: str) -> str:
  """Fixes "a orange ..." to "an orange ..."."""
  return _A_BEFORE_VOWEL.sub("an ", text)


def vocabulary() -> List[str]:
  """Every word and punctuation mark that captions and prompts can contain."""
  texts = _FULL_TEMPLATES + _SHORT_TEMPLATES + _TWO_TEMPLATES + _PROMPT_WORDS
  texts = texts + COLOR_NAMES + SHAPES + SIZES + POSITIONS + ["an"]
  words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", re.sub(r"\{\w*\}", " ", " ".join(texts)))
  return sorted(set(words))


class ShapesClassesSource(ShapesSource):
  """`shapes:classes`: one shape per image, text = its class name (`classification`).

  The train split draws from another stream than `shapes` (a mixture of the two views
  does not repeat images); evaluation splits are the same images as `shapes`'.
  """
  classification = True

  def __init__(self, split: str = "train", size: Optional[int] = None, seed: int = 0,
               image_size: int = 64):
    super().__init__(split=split, size=size, seed=seed, image_size=image_size,
                     max_shapes=1)

  def _entropy(self, index: int) -> List[int]:
    tail = [_CLASSES_STREAM] if self.split == "train" else []
    return super()._entropy(index) + tail

  def __getitem__(self, index: int) -> Dict[str, Any]:
    ex = super().__getitem__(index)
    ex["text"] = CLASS_NAMES[ex["label"]]
    ex["key"] = f"shapes_classes/{self.split}/{int(index)}"
    return ex

  def __repr__(self) -> str:
    return "ShapesClassesSource" + super().__repr__()[len("ShapesSource"):]


# ---------------------------------------------------------------- shapes:hard
HARD_COLORS: Dict[str, Sequence[int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (230, 210, 25),
    "green": (40, 160, 55),
    "cyan": (25, 185, 200),
    "blue": (35, 75, 215),
    "purple": (130, 50, 180),
    "pink": (240, 115, 185),
}
HARD_COLOR_NAMES: List[str] = list(HARD_COLORS)
HARD_SHAPES: List[str] = ["circle", "square", "triangle", "cross", "star", "diamond",
                          "hexagon", "heart"]
FILLS: List[str] = ["solid", "outlined", "striped"]
HARD_SIZES: List[str] = ["small", "large"]
# The 4 quadrants' centres (objects of multi-object images take distinct ones) and the
# image centre (single objects only), as in `shapes`.
HARD_POSITIONS: List[str] = list(POSITIONS)
HARD_CLASS_NAMES: List[str] = [f"{c} {s}" for c in HARD_COLOR_NAMES for s in HARD_SHAPES]
# One held-out shape per colour and one colour per shape (the diagonal): every colour
# and every shape is still seen in training, 7 times each.
HELD_OUT = frozenset((c, HARD_SHAPES[i]) for i, c in enumerate(HARD_COLOR_NAMES))
HARD_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "heldout": 3, "relations": 4}
HARD_DEFAULT_SIZES = {"train": 1_000_000, "validation": 2_400, "test": 2_400,
                      "heldout": 2_400, "relations": 2_400}
HARD_LABELLED_SPLITS = ("train", "validation", "test", "heldout")

_CLASSES_STREAM = 1  # SeedSequence tail of a classification view's train split.
_HARD_STREAM = 2  # ... and of shapes:hard (its classification view: 2 + 1).
# Side as a fraction of the image side (a quadrant holds the largest).
_HARD_SIZE_RANGES = {"small": (0.25, 0.32), "large": (0.36, 0.44)}
_HARD_FILL_P = (0.5, 0.25, 0.25)  # Probabilities of FILLS.
_HARD_COUNTS = (1, 2, 3)  # Objects per train image ...
_HARD_COUNT_P = (0.5, 0.35, 0.15)  # ... with these probabilities.
_HARD_COLOR_JITTER = 18
_HARD_NOISE = 10
_HARD_LIGHT = (0.85, 1.1)  # Range of the per-image brightness factor.
_HARD_CLUTTER = (0, 3)  # Grey clutter strokes per image, [lo, hi).

# Caption templates; fields per object: c (colour), s (shape), f (fill), z (size),
# p (position), suffixed 1, 2, 3; `rel` relates object 1 to object 2 ("left of",
# "above", ...), `inv` object 2 to object 1. Their phrases include those of the
# 'shapes' zero-shot templates so that every prompt word is trained.
# One object: 7 of 12 templates name only colour and shape, so that a batch's captions
# often differ only in the shape (with the fill, size and position in most captions,
# colour and those attributes tell a batch's captions apart and no shape is learnt).
_HARD_ONE = [
    "a {c1} {s1}",
    "a {c1} {s1}.",
    "a photo of a {c1} {s1}.",
    "a picture of a {c1} {s1}.",
    "an image showing a {c1} {s1}.",
    "a simple drawing of a {c1} {s1}.",
    "a {c1} {s1} on a plain background.",
    "a {z1} {f1} {c1} {s1} in the {p1}",
    "a photo of a {z1} {f1} {c1} {s1} in the {p1}.",
    "there is a {f1} {c1} {s1} in the {p1}.",
    "an image showing a {z1} {c1} {s1}.",
    "a picture of a {f1} {c1} {s1}.",
]
_HARD_TWO = [
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a {c2} {s2} {inv} a {c1} {s1}",
    "a photo of a {f1} {c1} {s1} {rel} a {f2} {c2} {s2}.",
    "a picture of a {c1} {s1} and a {c2} {s2}.",
    "a {z1} {c1} {s1} in the {p1} and a {z2} {c2} {s2} in the {p2}",
    "two shapes: a {c1} {s1} {rel} a {c2} {s2}.",
    "a simple drawing of a {c2} {s2} {inv} a {c1} {s1}.",
]
_HARD_THREE = [
    "a {c1} {s1}, a {c2} {s2} and a {c3} {s3}",
    "three shapes: a {c1} {s1}, a {c2} {s2} and a {c3} {s3}.",
    "a picture of a {f1} {c1} {s1}, a {f2} {c2} {s2} and a {f3} {c3} {s3}.",
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a photo of a {c3} {s3} and a {c2} {s2} {inv} a {c1} {s1}.",
]
_RELATION_WORDS = ["left of", "right of", "above", "below"]
_STRIPES: Dict[int, Any] = {}  # supersampling -> 'L' diagonal stripes (cache).


def _hard_polygon(shape: str, cx: float, cy: float, h: float):
  """Vertices of a polygonal `shape` with half-extent `h` centred at (cx, cy)."""
  if shape == "triangle":
    pts = [(0, -1), (1, 0.85), (-1, 0.85)]
  elif shape == "diamond":
    pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
  elif shape == "hexagon":
    pts = [(np.cos(a), np.sin(a)) for a in np.pi / 2 + np.arange(6) * np.pi / 3]
  elif shape == "star":
    a = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    pts = list(zip(r * np.cos(a), r * np.sin(a) + 0.08))
  elif shape == "heart":
    t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    x = 16 * np.sin(t) ** 3 / 17
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 15
    pts = list(zip(x, y + 0.1))
  else:
    raise ValueError(f"Unknown shape '{shape}'.")
  return [(cx + h * float(px), cy + h * float(py)) for px, py in pts]


def _hard_mask(shape: str, fill: str, half: float, ss: int, offset) -> Image.Image:
  """'L' mask (255 = paint) of a `fill`ed `shape` in a box of side ~2 * half."""
  box = int(np.ceil(2 * half)) + 2 * ss
  mask = Image.new("L", (box, box), 0)
  draw = ImageDraw.Draw(mask)
  c = box / 2
  if shape == "circle":
    draw.ellipse((c - half, c - half, c + half, c + half), fill=255)
  elif shape == "square":
    h = half * 0.82
    draw.rectangle((c - h, c - h, c + h, c + h), fill=255)
  elif shape == "cross":
    t = half / 3
    draw.rectangle((c - half, c - t, c + half, c + t), fill=255)
    draw.rectangle((c - t, c - half, c + t, c + half), fill=255)
  else:
    draw.polygon(_hard_polygon(shape, c, c, half), fill=255)
  if fill == "outlined":
    inner = mask.filter(ImageFilter.MinFilter(4 * ss + 1))  # A 2 px outline.
    mask = ImageChops.subtract(mask, inner)
  elif fill == "striped":
    ox, oy = offset
    stripes = _stripes(max(ox, oy) + box, ss)
    mask = ImageChops.multiply(mask, stripes.crop((ox, oy, ox + box, oy + box)))
  return mask


def _stripes(side: int, ss: int) -> Image.Image:
  """Diagonal stripes, 2 px on / 2 px off at output resolution, at least `side`
  square (cached per `ss`, grown to a power of two when needed)."""
  have = _STRIPES.get(ss)
  if have is None or have.size[0] < side:
    n = 1 << max(8, (side - 1).bit_length())
    y, x = np.mgrid[:n, :n]
    on = ((x + y) // (2 * ss)) % 2 == 0
    _STRIPES[ss] = have = Image.fromarray((on * 255).astype(np.uint8), "L")
  return have


def _render_hard(rng: np.random.Generator, objs, image_size: int) -> np.ndarray:
  """Grey clutter then `objs` on a noisy light background -> uint8 [H, W, 3]."""
  ss = _SUPERSAMPLE
  side = image_size * ss
  grey = int(rng.integers(175, 241))
  bg = tuple(int(v) for v in np.clip(grey + rng.integers(-12, 13, size=3), 0, 255))
  img = Image.new("RGB", (side, side), bg)
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(*_HARD_CLUTTER))):
    tone = int(rng.integers(90, 171))
    x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, size=4))
    if rng.random() < 0.6:
      draw.line((x0, y0, x1, y1), fill=(tone,) * 3, width=int(rng.integers(1, 3)) * ss)
    else:
      r = float(rng.uniform(0.04, 0.1)) * side
      draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=(tone,) * 3, width=ss)
  jitter = max(1, image_size // 32) * ss
  for obj in objs:
    lo, hi = _HARD_SIZE_RANGES[obj["size"]]
    half = rng.uniform(lo, hi) * side / 2
    ax, ay = _ANCHORS[obj["position"]]
    dx, dy = rng.integers(-jitter, jitter + 1, size=2)
    cx = min(max(ax * side + dx, half + ss), side - ss - half)
    cy = min(max(ay * side + dy, half + ss), side - ss - half)
    shift = rng.integers(-_HARD_COLOR_JITTER, _HARD_COLOR_JITTER + 1, size=3)
    color = tuple(min(max(int(v + d), 0), 255)
                  for v, d in zip(HARD_COLORS[obj["color"]], shift))
    x0, y0 = int(round(cx - half)) - ss, int(round(cy - half)) - ss
    mask = _hard_mask(obj["shape"], obj["fill"], half, ss, (x0, y0))
    img.paste(color, (x0, y0, x0 + mask.size[0], y0 + mask.size[1]), mask)
  if ss > 1:
    img = img.reduce(ss)
  arr = np.asarray(img, dtype=np.float32) * np.float32(rng.uniform(*_HARD_LIGHT))
  arr += rng.integers(-_HARD_NOISE, _HARD_NOISE + 1, size=arr.shape, dtype=np.int16)
  return np.clip(arr, 0, 255).astype(np.uint8)


def _hard_object(rng: np.random.Generator, color: str, shape: str, position: str):
  return {"color": color, "shape": shape,
          "fill": FILLS[rng.choice(len(FILLS), p=_HARD_FILL_P)],
          "size": HARD_SIZES[rng.integers(len(HARD_SIZES))], "position": position}


def _hard_positions(rng: np.random.Generator, n: int) -> List[str]:
  """One object: any of the 5 positions; more: distinct quadrants."""
  if n == 1:
    return [HARD_POSITIONS[rng.integers(len(HARD_POSITIONS))]]
  return [_CORNERS[k] for k in rng.choice(len(_CORNERS), size=n, replace=False)]


def _hard_pairs(rng: np.random.Generator, n: int, pool: Sequence[int]):
  """`n` distinct (colour, shape) class indices from `pool`."""
  return [int(k) for k in rng.choice(pool, size=n, replace=False)]


_SEEN = [k for k, name in enumerate(HARD_CLASS_NAMES)
         if tuple(name.split(" ")) not in HELD_OUT]
_UNSEEN = [k for k, name in enumerate(HARD_CLASS_NAMES)
           if tuple(name.split(" ")) in HELD_OUT]


def _relation(a, b) -> Sequence[str]:
  """(a's relation to b, b's relation to a) from their quadrants."""
  (xa, ya), (xb, yb) = _ANCHORS[a["position"]], _ANCHORS[b["position"]]
  if xa != xb:
    return ("left of", "right of") if xa < xb else ("right of", "left of")
  return ("above", "below") if ya < yb else ("below", "above")


def _hard_captions(rng: np.random.Generator, objs) -> List[str]:
  """3-5 distinct captions naming every object (and a relation for 2-3 objects)."""
  fields = {}
  for k, o in enumerate(objs, 1):
    fields.update({f"c{k}": o["color"], f"s{k}": o["shape"], f"f{k}": o["fill"],
                   f"z{k}": o["size"], f"p{k}": o["position"]})
  if len(objs) > 1:
    fields["rel"], fields["inv"] = _relation(objs[0], objs[1])
  templates = {1: _HARD_ONE, 2: _HARD_TWO, 3: _HARD_THREE}[len(objs)]
  n = int(rng.integers(3, 6))
  picks = rng.choice(len(templates), size=n, replace=False)
  return [_articles(templates[j].format(**fields)) for j in picks]


class HardShapesSource:
  """`shapes:hard` (see the module docstring): a random-access benchmark source.

  Args:
    split: one of `HARD_SPLIT_IDS`.
    size: number of examples; None picks a per-split default (train: 1M).
    seed: global seed; together with split and index it fixes each example.
    image_size: output height and width in pixels.
    classes: the classification view (`shapes:hard,classes`).
  """

  def __init__(self, split: str = "train", size: Optional[int] = None, seed: int = 0,
               image_size: int = 64, classes: bool = False):
    splits = HARD_LABELLED_SPLITS if classes else tuple(HARD_SPLIT_IDS)
    if split not in splits:
      hint = (" ('relations' has no class labels: use it with 'shapes:hard')"
              if split in HARD_SPLIT_IDS else "")
      raise errors.ConfigError(
          f"Unknown shapes:hard{',classes' if classes else ''} split '{split}'; use one "
          f"of {list(splits)}{hint}.")
    if image_size < 32:
      raise errors.ConfigError(f"The shapes:hard source needs image_size >= 32 "
                               f"(config.data.image_size), got {image_size}.")
    self.split = split
    self.size = HARD_DEFAULT_SIZES[split] if size is None else int(size)
    if self.size < 0:
      raise errors.ConfigError(f"size must be >= 0, got {size}.")
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.classification = bool(classes)

  def __len__(self) -> int:
    return self.size

  @property
  def class_names(self) -> List[str]:
    """The 64 zero-shot class names "<colour> <shape>"; labels index them."""
    return list(HARD_CLASS_NAMES)

  def __repr__(self) -> str:
    return (f"HardShapesSource(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"image_size={self.image_size}, classes={self.classification})")

  def _rng(self, index: int, salt: int = 0) -> np.random.Generator:
    stream = _HARD_STREAM + (self.classification and self.split == "train")
    return np.random.default_rng(np.random.SeedSequence(
        [self.seed, HARD_SPLIT_IDS[self.split], index, stream, salt]))

  def _objects(self, rng: np.random.Generator, index: int):
    """The example's objects (a list of dicts)."""
    split = self.split
    if split == "relations":
      # Pair k = index // 2: two objects of different colours and shapes whose swapped
      # pairs are seen too; the odd twin swaps the colours.
      prng = self._rng(index // 2, salt=1)
      while True:
        (c1, c2), (s1, s2) = (prng.choice(len(HARD_COLOR_NAMES), 2, replace=False),
                              prng.choice(len(HARD_SHAPES), 2, replace=False))
        combos = [(c1, s1), (c2, s2), (c2, s1), (c1, s2)]
        if all((HARD_COLOR_NAMES[c], HARD_SHAPES[s]) not in HELD_OUT for c, s in combos):
          break
      places = _hard_positions(prng, 2)
      colors = (c1, c2) if index % 2 == 0 else (c2, c1)
      return [_hard_object(prng, HARD_COLOR_NAMES[c], HARD_SHAPES[s], place)
              for c, s, place in zip(colors, (s1, s2), places)]
    if split == "train" and not self.classification:
      n = int(rng.choice(_HARD_COUNTS, p=_HARD_COUNT_P))
    else:
      n = 1
    if split in ("train", "validation"):
      pool = _SEEN
    elif split == "heldout":
      pool = _UNSEEN
    else:
      pool = range(len(HARD_CLASS_NAMES))
    pairs = _hard_pairs(rng, n, pool)
    places = _hard_positions(rng, n)
    return [_hard_object(rng, *HARD_CLASS_NAMES[k].split(" "), place)
            for k, place in zip(pairs, places)]

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}.")
    rng = self._rng(index)
    objs = self._objects(rng, index)
    image = _render_hard(rng, objs, self.image_size)
    label = (HARD_CLASS_NAMES.index(f"{objs[0]['color']} {objs[0]['shape']}")
             if len(objs) == 1 else -1)
    keywords = list(dict.fromkeys([o["color"] for o in objs] + [o["shape"] for o in objs]))
    if self.classification:
      text = HARD_CLASS_NAMES[label]
      kind = "shapes_hard_classes"
    else:
      text = _hard_captions(rng, objs)
      kind = "shapes_hard"
    return {"image": image, "text": text, "label": label, "keywords": keywords,
            "key": f"{kind}/{self.split}/{index}"}


def hard_vocabulary() -> List[str]:
  """The `words:shapes_hard` vocabulary: every word of `shapes` and `shapes:hard`
  captions and of the 'shapes' prompts."""
  texts = _HARD_ONE + _HARD_TWO + _HARD_THREE + _RELATION_WORDS + HARD_COLOR_NAMES
  texts = texts + HARD_SHAPES + FILLS + HARD_SIZES + HARD_POSITIONS
  words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", re.sub(r"\{\w*\}", " ", " ".join(texts)))
  return sorted(set(words) | set(vocabulary()))


_VARIANTS = ("hard",)
_OPTIONS = ("classes",)


@SOURCES.register("shapes")
def make_shapes_source(split: str = "train", size: Optional[int] = None,
                       seed: int = 0, image_size: int = 64,
                       max_shapes: int = 2, path: str = "", **unused):
  """Registry factory: `path` (the spec after 'shapes:') lists options 'hard' and/or
  'classes' separated by ',' or '+' (module docstring); extra keyword arguments are
  ignored."""
  del unused
  options = [o.strip() for o in re.split(r"[,+]", path or "") if o.strip()]
  noisy = [o for o in options if o.startswith("noisy=")]
  options = [o for o in options if not o.startswith("noisy=")]
  if noisy:
    source = make_shapes_source(split, size, seed, image_size, max_shapes,
                                ",".join(options))
    return _with_caption_noise(source, noisy, path, split)
  unknown = [o for o in options if o not in _VARIANTS + _OPTIONS]
  if unknown or len(set(options)) != len(options):
    raise errors.ConfigError(
        f"Unknown or repeated shapes option(s) {unknown or options} in 'shapes:{path}'; "
        f"the spec is 'shapes', 'shapes:hard', 'shapes:classes' or "
        f"'shapes:hard,classes' (or 'shapes:hard+classes'), optionally with ',noisy=F'.")
  classes = "classes" in options
  if "hard" in options:
    return HardShapesSource(split=split, size=size, seed=seed, image_size=image_size,
                            classes=classes)
  if classes:
    return ShapesClassesSource(split=split, size=size, seed=seed, image_size=image_size)
  return ShapesSource(split=split, size=size, seed=seed, image_size=image_size,
                      max_shapes=max_shapes)


def _with_caption_noise(source, noisy, path, split):
  """`source` with option 'noisy=F' (`caption_noise.NoisyCaptions`: the captions of a
  seeded fraction F of the records shuffled among them; for curation experiments).
  Only split 'train' is corrupted: evaluation splits stay `source` itself."""
  from vlp_jax.data import caption_noise  # pylint: disable=g-import-not-at-top
  try:
    fraction = float(noisy[0].partition("=")[2])
  except ValueError:
    fraction = -1.0
  if len(noisy) > 1 or not 0.0 <= fraction <= 1.0:
    raise errors.ConfigError(
        f"Bad caption-noise option {noisy} in 'shapes:{path}'; give one 'noisy=F' with "
        "F in [0, 1], e.g. 'shapes:hard,noisy=0.3'.")
  if getattr(source, "classification", False):
    raise errors.ConfigError(
        f"'shapes:{path}': the classification view's captions are its labels' class "
        "names; 'noisy=F' applies to the caption views ('shapes', 'shapes:hard').")
  if split != "train":
    logging.info("'shapes:%s': caption noise applies to split 'train' only; split "
                 "'%s' is clean.", path, split)
    return source
  return caption_noise.NoisyCaptions(source, fraction, seed=source.seed)
