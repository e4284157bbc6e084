"""Per-example transforms: decode, resize/crop, normalise, caption choice, tokenization.

`element['image']` may be a uint8 [H, W, 3] array or encoded bytes (JPEG/PNG/...);
bytes are decoded here with `decode.decode_image`, so decoding runs in the (parallel)
transform workers rather than in the source.
"""
import dataclasses
import math
from typing import Any, Tuple

import grain
import numpy as np
from PIL import Image

from vlp_jax import errors
from vlp_jax.data import decode

# name -> (mean, std) in [0, 1] pixel units.
NORMALIZATIONS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # -> [-1, 1]
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # -> [0, 1]
}


def normalize(image_u8: np.ndarray, kind: str) -> np.ndarray:
  """uint8 [H, W, 3] -> float32, (x/255 - mean) / std."""
  if kind not in NORMALIZATIONS:
    raise errors.ConfigError(
        f"Unknown normalization '{kind}'; use one of {sorted(NORMALIZATIONS)}.")
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


def random_resized_crop(image_u8: np.ndarray, size: int, rng: np.random.Generator,
                        scale: Tuple[float, float] = (0.9, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = False) -> np.ndarray:
  """torchvision's RandomResizedCrop: a random crop of area fraction in `scale` and
  aspect ratio (w / h) in `ratio` (10 tries, then a ratio-clamped center crop),
  resized to size x size (bicubic); `flip` mirrors it horizontally with p = 0.5.
  """
  h, w = image_u8.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  box = None
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      box = (left, top, left + cw, top + ch)
      break
  if box is None:  # Fallback: center crop, aspect ratio clamped to `ratio`.
    in_ratio = w / h
    if in_ratio < min(ratio):
      cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
      cw, ch = int(round(h * max(ratio))), h
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    box = (left, top, left + cw, top + ch)
  out = np.asarray(Image.fromarray(image_u8).resize((size, size), Image.BICUBIC, box=box))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def as_image_u8(image) -> np.ndarray:
  """uint8 [H, W, 3] arrays pass through; bytes / PIL images / other arrays are decoded."""
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
      image.ndim == 3 and image.shape[-1] == 3):
    return image
  return decode.decode_image(image)


def as_caption_list(text) -> list:
  return [text] if isinstance(text, str) else list(text)


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  """Example -> {'image': float32 [S, S, 3], 'text': int32 [L]} with a random caption.

  Defaults reproduce plain resize + center crop. `crop_scale[0] < 1` switches to
  `random_resized_crop` (area fraction in `crop_scale`, aspect ratio in `crop_ratio`);
  `flip` adds random horizontal flips (off by default: they break "left"/"right"
  captions); `clean_captions` strips captions, drops empty ones and raises
  BadRecord('bad_caption') when none is left.
  """
  tokenizer: Any
  image_size: int
  context_length: int
  normalization: str = "clip"
  crop_scale: Tuple[float, float] = (1.0, 1.0)
  crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  clean_captions: bool = False

  def random_map(self, element, rng: np.random.Generator):
    if self.clean_captions:
      captions = decode.clean_captions(element["text"])
    else:
      captions = as_caption_list(element["text"])
    caption = captions[rng.integers(len(captions))]
    image = as_image_u8(element["image"])
    if self.crop_scale[0] < 1.0:
      image = random_resized_crop(image, self.image_size, rng, scale=self.crop_scale,
                                  ratio=self.crop_ratio, flip=self.flip)
    else:
      image = resize_center_crop(image, self.image_size)
      if self.flip and rng.random() < 0.5:
        image = image[:, ::-1]
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
    out["image"] = normalize(resize_center_crop(as_image_u8(element["image"]),
                                                self.image_size),
                             self.normalization)
    out["text"] = as_caption_list(element.get("text", []))
    return out
