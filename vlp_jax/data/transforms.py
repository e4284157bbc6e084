"""Per-example transforms: decode, resize/crop, normalise, caption choice, tokenization.

`element['image']` may be encoded bytes (JPEG/PNG/...; what file and record sources
give), a uint8 [H, W, 3] array or a PIL image. Bytes are decoded here, in the
(parallel) transform workers, JPEGs at a reduced DCT scale when the crops allow it
(`decode.open_image`).
"""
import dataclasses
import functools
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


def normalization_constants(kind: str) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std) float32 [3] of normalization `kind`, in [0, 1] pixel units."""
  if kind not in NORMALIZATIONS:
    raise errors.ConfigError(
        f"Unknown normalization '{kind}'; use one of {sorted(NORMALIZATIONS)}.")
  return tuple(np.asarray(v, np.float32) for v in NORMALIZATIONS[kind])


@functools.lru_cache(maxsize=None)
def _affine(kind: str) -> Tuple[np.ndarray, np.ndarray]:
  """(scale, offset) float32 [3] with x * scale + offset = (x / 255 - mean) / std."""
  mean, std = (np.asarray(v, np.float64) for v in normalization_constants(kind))
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalize(image_u8: np.ndarray, kind: str) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x/255 - mean) / std, computed as one multiply-add
  with precomputed float32 constants (within 1e-6 of the three-step formula)."""
  scale, offset = _affine(kind)
  out = np.multiply(image_u8, scale, dtype=np.float32)
  out += offset
  return out


def center_crop_box(h: int, w: int, size: int) -> Tuple[float, float, float, float]:
  """The (left, top, right, bottom) box, in source pixels, that `resize_center_crop`
  keeps: resizing it to size x size equals resizing the whole image (short side to
  `size`) and cutting out the center."""
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (nh - size) // 2, (nw - size) // 2
  return (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)


def resize_center_crop(image_u8: np.ndarray, size: int) -> np.ndarray:
  """Resizes the short side to `size` (bicubic) and center-crops to size x size."""
  h, w = image_u8.shape[:2]
  if (h, w) == (size, size):
    return image_u8
  return np.asarray(decode.Decoded(Image.fromarray(image_u8), (w, h)).resize(
      center_crop_box(h, w, size), size))


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


def reduction(opened: decode.OpenImage, crops) -> int:
  """The largest DCT reduction (`decode.REDUCTIONS`, at most `opened.max_reduce`)
  that keeps every (box, output size) of `crops` at >= its output size on both sides,
  so no crop is upsampled where the full decode would not be."""
  if opened.max_reduce == 1 or not crops:
    return 1
  room = min(min(b[2] - b[0], b[3] - b[1]) / size for b, size in crops)
  return next((a for a in decode.REDUCTIONS if a <= opened.max_reduce and a <= room),
              1)  # Boxes smaller than their output (upsampled): full size.


def decode_for(opened: decode.OpenImage, crops) -> decode.Decoded:
  """`opened` decoded at the `reduction` its `crops` allow."""
  return opened.decode(reduction(opened, crops))


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

  Decoding: crop boxes are drawn from the image's full-resolution (EXIF-oriented)
  size read from its header, then a JPEG is decoded at the smallest DCT scale (1, 1/2,
  1/4, 1/8) that keeps every crop of the example (rows and views) at >= its output
  size on both sides (`decode.open_image`, `reduction`), and each box is resized
  from that image. The draws are those of a full decode.

  `normalize_on_host` False: 'image' and 'views/*' stay uint8 (normalised later, e.g.
  on device with `normalization_constants`); nothing else changes.
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
  normalize_on_host: bool = True

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

  def _plan(self, w, h, rng, n):
    """The n rows' (full-resolution box, flip): the same draws, in the same order,
    as cropping a decoded image."""
    if self.crop_scale[0] < 1.0:
      plan = []
      for _ in range(n):
        box = views.random_crop_box(h, w, rng, self.crop_scale, self.crop_ratio)
        plan.append((box, self.flip and rng.random() < 0.5))
      return plan
    box = center_crop_box(h, w, self.image_size)
    return [(box, self.flip and rng.random() < 0.5) for _ in range(n)]

  def _draw(self, opened, rng, k, with_views):
    """(crop plan, view seed, view plans) drawn from the full-resolution size."""
    w, h = opened.size
    plan = self._plan(w, h, rng, k)
    if not with_views:
      return plan, None, None
    view_seed = int(rng.integers(2**63))
    return plan, view_seed, views.plan_view_rows(w, h, self.image_views, view_seed, k)

  def _image(self, array):
    return normalize(array, self.normalization) if self.normalize_on_host else array

  def random_map(self, element, rng: np.random.Generator):
    key = element.get("key")
    if key is None:
      raise ValueError("example has no 'key' (needed for its 'image_id')")
    # The header first (no random draws): an unreadable image is reported as such, as
    # when sources decoded it, whatever else is wrong with the example.
    opened = decode.open_image(element["image"])
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
    # Crop boxes come from the header's size; the image is then decoded at the
    # smallest scale that keeps every crop at >= its output size.
    with_views = bool(self.image_views or self.text_views)
    state = rng.bit_generator.state if opened.max_reduce > 1 else None
    plan, view_seed, view_plan = self._draw(opened, rng, k, with_views)
    crops = [(box, self.image_size) for box, _ in plan]
    if view_plan:
      crops += views.plan_crops(self.image_views, view_plan)
    decoded = decode_for(opened, crops)
    if decoded.size != opened.size:  # A broken EXIF block: the header's size was wrong.
      rng.bit_generator.state = state  # Draw again from the decoded image's size.
      decoded = opened.decode(1)
      plan, view_seed, view_plan = self._draw(decode.OpenImage(None, decoded=decoded),
                                              rng, k, with_views)
    images = self._render(decoded, plan)
    picked = [captions[i] for i in picks]
    tokens = self.tokenizer.tokenize(picked, self.context_length)
    ids = np.array([label, data_type, example_id(key)], np.int32)
    if k == 1:
      out = {"image": self._image(images[0]), "text": tokens[0],
             "label": ids[0], "data_type": ids[1], "image_id": ids[2]}
    else:
      out = {"image": self._image(np.stack(images)), "text": np.asarray(tokens),
             "label": np.full(k, ids[0]), "data_type": np.full(k, ids[1]),
             "image_id": np.full(k, ids[2])}
    if with_views:
      out.update(self._views(decoded, view_plan, picked, view_seed))
    return out

  def _render(self, decoded, plan):
    """uint8 [S, S, 3] per row of `plan` (one resize when all rows share a box)."""
    s, out, done = self.image_size, [], {}
    for box, flip in plan:
      if box not in done:
        done[box] = np.asarray(decoded.resize(box, s))
      image = done[box]
      out.append(np.ascontiguousarray(image[:, ::-1]) if flip else image)
    return out

  def _views(self, decoded, view_plan, captions, view_seed):
    """The 'views/*', 'view_boxes/*' and 'text_views/*' values of one example's rows
    (without the row axis when there is one row)."""
    k, out = len(captions), {}
    for name, (crops, boxes) in views.render_view_rows(decoded, self.image_views,
                                                       view_plan, k).items():
      out[views.IMAGE_PREFIX + name] = self._image(crops)
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
  """Example -> normalised image plus its captions / label kept as python values.
  The image is resized (short side) and center-cropped, JPEGs decoded at the smallest
  DCT scale that keeps the crop at >= `image_size` px."""
  image_size: int
  normalization: str = "clip"

  def map(self, element):
    out = dict(element)
    opened = decode.open_image(element["image"])
    w, h = opened.size
    box = center_crop_box(h, w, self.image_size)
    decoded = decode_for(opened, [(box, self.image_size)])
    if decoded.size != opened.size:  # A broken EXIF block: the header's size was wrong.
      decoded = opened.decode(1)
      w, h = decoded.size
      box = center_crop_box(h, w, self.image_size)
    image = np.asarray(decoded.resize(box, self.image_size))
    out["image"] = normalize(image, self.normalization)
    out["text"] = as_caption_list(element.get("text", []))
    return out
