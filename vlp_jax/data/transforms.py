"""Per-example transforms: image resize/normalise, caption choice, tokenization."""
import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

# name -> (mean, std) in [0, 1] pixel units.
NORMALIZATIONS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # -> [-1, 1]
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # -> [0, 1]
}


def normalize(image_u8: np.ndarray, kind: str) -> np.ndarray:
  """uint8 [H, W, 3] -> float32, (x/255 - mean) / std."""
  if kind not in NORMALIZATIONS:
    raise ValueError(f"Unknown normalization '{kind}'; use one of {sorted(NORMALIZATIONS)}.")
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[kind])
  return (image_u8.astype(np.float32) / 255.0 - mean) / std


def resize_center_crop(image_u8: np.ndarray, size: int) -> np.ndarray:
  """Resizes the short side to `size` (bicubic) and center-crops to size x size."""
  h, w = image_u8.shape[:2]
  if (h, w) == (size, size):
    return image_u8
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = Image.fromarray(image_u8).resize((nw, nh), Image.BICUBIC)
  top, left = (nh - size) // 2, (nw - size) // 2
  return np.asarray(img)[top:top + size, left:left + size]


def as_caption_list(text) -> list:
  return [text] if isinstance(text, str) else list(text)


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  """Example -> {'image': float32 [S, S, 3], 'text': int32 [L]} with a random caption."""
  tokenizer: Any
  image_size: int
  context_length: int
  normalization: str = "clip"

  def random_map(self, element, rng: np.random.Generator):
    captions = as_caption_list(element["text"])
    caption = captions[rng.integers(len(captions))]
    image = resize_center_crop(element["image"], self.image_size)
    return {
        "image": normalize(image, self.normalization),
        "text": self.tokenizer.tokenize([caption], self.context_length)[0],
    }


@dataclasses.dataclass
class EvalTransform(grain.transforms.Map):
  """Example -> normalised image plus its captions / label kept as python values."""
  image_size: int
  normalization: str = "clip"

  def map(self, element):
    out = dict(element)
    out["image"] = normalize(resize_center_crop(element["image"], self.image_size),
                             self.normalization)
    out["text"] = as_caption_list(element.get("text", []))
    return out
