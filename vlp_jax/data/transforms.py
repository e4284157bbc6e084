"""Per-example transforms: decode, resize/crop, normalise, caption choice, tokenization.

`element['image']` may be a uint8 [H, W, 3] array or encoded bytes (JPEG/PNG/...);
bytes are decoded here with `decode.decode_image`, so decoding runs in the (parallel)
transform workers rather than in the source.
"""
import dataclasses
import hashlib
from typing import Any, Tuple

import grain
import numpy as np
from PIL import Image

from vlp_jax import errors
from vlp_jax.data import decode, views

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
  box = views.random_crop_box(h, w, rng, scale, ratio)
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


def example_id(key) -> int:
  """A deterministic 31-bit id (int in [0, 2**31)) of a source example's key: the first
  4 bytes of its blake2b digest, so the same in every process, worker and run (unlike
  Python's salted hash()).

  Ids of distinct keys collide like random 31-bit numbers: a batch of n distinct
  examples holds about n * (n - 1) / 2**32 colliding pairs on average (B = 4,096:
  0.004 per batch, one pair in ~256 batches; B = 32,768: 0.25). The ids group the rows
  of one example within a batch; they are not unique over a large dataset.
  """
  data = key if isinstance(key, bytes) else str(key).encode("utf-8")
  return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little") & (
      0x7FFFFFFF)


@dataclasses.dataclass
class TrainTransform(grain.transforms.RandomMap):
  """Example -> {'image': float32 [S, S, 3], 'text': int32 [L] (a random caption),
  'label', 'data_type', 'image_id': int32 scalars}.

  Defaults reproduce plain resize + center crop. `crop_scale[0] < 1` switches to
  `random_resized_crop` (area fraction in `crop_scale`, aspect ratio in `crop_ratio`);
  `flip` adds random horizontal flips (off by default: they break "left"/"right"
  captions); `clean_captions` strips captions, drops empty ones and raises
  BadRecord('bad_caption') when none is left.

  Caption data (`class_names` empty): 'label' 0, 'data_type' 0. Classification data
  (`class_names` set): the example's 'label' (a class index) picks a class name, the
  captions are `class_templates` (a `data.templates.Templates`) filled with it, and
  'label' = 1 + `label_offset` + class, 'data_type' 1. 'image_id' is
  `example_id(element['key'])`.

  `captions_per_image` k > 1: every value gains a leading axis of k rows (image
  [k, S, S, 3], text [k, L], ...): k captions (distinct when the example has >= k,
  else drawn with replacement), each row with its own random crop / flip.

  `image_views` / `text_views` (`views.ImageView` / `views.TextView`, from
  `views.image_views(config.data)` / `views.text_views(...)`) add 'views/NAME'
  float32 [count, S, S, 3] (with `boxes`, 'view_boxes/NAME' float32 [count, 4]) and
  'text_views/NAME' int32 [L] per row (see `views.py`); drawn after everything else,
  so the other values are the same with or without them.
  """
  tokenizer: Any
  image_size: int
  context_length: int
  normalization: str = "clip"
  crop_scale: Tuple[float, float] = (1.0, 1.0)
  crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = False
  clean_captions: bool = False
  captions_per_image: int = 1
  class_names: Tuple[str, ...] = ()
  class_templates: Any = None
  label_offset: int = 0
  image_views: Tuple[Any, ...] = ()
  text_views: Tuple[Any, ...] = ()

  def _texts_and_label(self, element):
    """(captions or prompts, batch label, data type) of one example."""
    if not self.class_names:
      return element["text"], 0, 0
    label = int(element["label"])
    if not 0 <= label < len(self.class_names):
      raise ValueError(f"label {label} is not a class index in 0..."
                       f"{len(self.class_names) - 1}")
    prompts = self.class_templates.prompts(self.class_names[label])
    return prompts, 1 + self.label_offset + label, 1

  def _crops(self, image, rng, n):
    if self.crop_scale[0] < 1.0:
      return [random_resized_crop(image, self.image_size, rng, scale=self.crop_scale,
                                  ratio=self.crop_ratio, flip=self.flip)
              for _ in range(n)]
    image = resize_center_crop(image, self.image_size)
    return [image[:, ::-1] if self.flip and rng.random() < 0.5 else image
            for _ in range(n)]

  def random_map(self, element, rng: np.random.Generator):
    key = element.get("key")
    if key is None:
      raise ValueError("example has no 'key' (needed for its 'image_id')")
    text, label, data_type = self._texts_and_label(element)
    if self.clean_captions:
      captions = decode.clean_captions(text)
    else:
      captions = as_caption_list(text)
    k = self.captions_per_image
    if k == 1:
      picks = [rng.integers(len(captions))]
    elif len(captions) >= k:
      picks = rng.choice(len(captions), size=k, replace=False)
    else:
      picks = rng.integers(len(captions), size=k)
    image = as_image_u8(element["image"])
    images = self._crops(image, rng, k)
    picked = [captions[i] for i in picks]
    tokens = self.tokenizer.tokenize(picked, self.context_length)
    ids = np.array([label, data_type, example_id(key)], np.int32)
    if k == 1:
      out = {"image": normalize(images[0], self.normalization), "text": tokens[0],
             "label": ids[0], "data_type": ids[1], "image_id": ids[2]}
    else:
      out = {"image": normalize(np.stack(images), self.normalization),
             "text": np.asarray(tokens),
             "label": np.full(k, ids[0]), "data_type": np.full(k, ids[1]),
             "image_id": np.full(k, ids[2])}
    if self.image_views or self.text_views:
      out.update(self._views(image, picked, int(rng.integers(2**63))))
    return out

  def _views(self, image, captions, view_seed):
    """The 'views/*', 'view_boxes/*' and 'text_views/*' values of one example's rows
    (without the row axis when there is one row)."""
    k, out = len(captions), {}
    for name, (crops, boxes) in views.image_view_rows(image, self.image_views,
                                                      view_seed, k).items():
      out[views.IMAGE_PREFIX + name] = normalize(crops, self.normalization)
      if boxes is not None:
        out[views.BOX_PREFIX + name] = boxes
    for name, texts in views.text_view_rows(captions, self.text_views,
                                            view_seed).items():
      out[views.TEXT_PREFIX + name] = np.asarray(
          self.tokenizer.tokenize(texts, self.context_length))
    if k == 1:
      out = {key: value[0] for key, value in out.items()}
    return out


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
