"""Procedurally generated "shapes" image-text dataset for demos and tests.

Each example is a light, slightly noisy background with one or two coloured shapes,
plus several lowercase captions naming colour, shape, size and position. Examples
are a pure function of (seed, split, index), so the source needs no files and any
index can be rendered on demand by any worker.

Zero-shot classes are the 24 "<color> <shape>" pairs (`CLASS_NAMES`); the label of an
example with exactly one shape is `color_index * len(SHAPES) + shape_index`, else -1.
Non-train splits always contain exactly one shape so every label is defined.
"""
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

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
# (vlp_jax/evaluators/templates.py): `vocabulary()` (the `words:shapes` tokenizer) covers
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

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}.")
    rng = np.random.default_rng(
        np.random.SeedSequence([self.seed, SPLIT_IDS[self.split], index]))
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


@SOURCES.register("shapes")
def make_shapes_source(split: str = "train", size: Optional[int] = None,
                       seed: int = 0, image_size: int = 64,
                       max_shapes: int = 2, **unused) -> ShapesSource:
  """Registry factory for `ShapesSource`; extra keyword arguments are ignored."""
  del unused
  return ShapesSource(split=split, size=size, seed=seed, image_size=image_size,
                      max_shapes=max_shapes)
