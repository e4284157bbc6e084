"""Robust image decoding and caption cleaning for (possibly dirty) web-scale records.

`decode_image` turns encoded bytes, a PIL image or an array into uint8 [H, W, 3] RGB:
EXIF orientation applied, alpha composited on white, palette / CMYK / 16-bit / int /
float modes mapped to 8-bit RGB. Records that cannot be used raise `BadRecord`, whose
`kind` is one of `KINDS` (the same kinds `robust.DropBad` counts).

`open_image` reads only a JPEG's header, so a caller can pick its crop boxes from the
full-resolution size first and then `decode` at a reduced scale (1/2, 1/4, 1/8 in the
DCT domain, libjpeg's scaled IDCT) that still holds every box at its output size;
`Decoded.box` maps full-resolution boxes into the reduced image (EXIF orientation
included). Other formats and arrays decode at full size.
"""
import io
import os
from typing import Any, List, Union

import numpy as np
from PIL import Image, ImageOps

KINDS = ("unreadable", "truncated", "empty", "zero_size", "missing_file", "bad_caption")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# EXIF orientation -> (swap, x reversed, y reversed) of the oriented image relative to
# the stored one: with `swap` the oriented x axis is the stored y axis; a reversed
# axis runs the other way (it decides where a reduced decode's padding lies).
_ORIENTATIONS = {1: (False, False, False), 2: (False, True, False),
                 3: (False, True, True), 4: (False, False, True),
                 5: (True, False, False), 6: (True, True, False),
                 7: (True, True, True), 8: (True, False, True)}
# JPEG DCT-domain reductions (Pillow's `Image.draft`), largest first.
REDUCTIONS = (8, 4, 2, 1)


class BadRecord(ValueError):
  """A record that cannot be used; `kind` says why (one of `KINDS`)."""

  def __init__(self, kind: str, message: str = ""):
    if kind not in KINDS:
      raise ValueError(f"Unknown bad-record kind '{kind}'; use one of {KINDS}.")
    self.kind, self.message = kind, message
    super().__init__(f"{kind}: {message}" if message else kind)

  def __reduce__(self):  # Survives pickling across grain worker processes.
    return type(self), (self.kind, self.message)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 4] -> uint8 [H, W, 3], alpha-blended over a white background."""
  alpha = rgba[..., 3:].astype(np.float32) / 255.0
  rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps a high-bit-depth / int / float array to uint8.

  Floats in [0, 1] are scaled by 255; values in [0, 255] are kept; ints in [0, 65535]
  are treated as 16-bit (divided by 257); anything else is min-max scaled.
  """
  if values.dtype == np.uint8:
    return values
  if values.dtype == np.bool_:
    return values.astype(np.uint8) * 255
  is_float = np.issubdtype(values.dtype, np.floating)
  x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  if x.size == 0:
    return x.astype(np.uint8)
  lo, hi = float(x.min()), float(x.max())
  if is_float and lo >= 0.0 and hi <= 1.0:
    x = x * 255.0
  elif lo >= 0.0 and hi <= 255.0 and values.dtype != np.uint16:
    pass
  elif lo >= 0.0 and hi <= 65535.0:
    x = x / 257.0
  else:
    x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
  """[H, W], [H, W, 1|2|3|4] array of any numeric dtype -> uint8 [H, W, 3]."""
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
    raise BadRecord("unreadable", f"expected an [H, W(, C)] image array, got shape "
                    f"{array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise BadRecord("zero_size", f"image array has shape {array.shape}")
  x = _scale_to_uint8(array)
  channels = x.shape[-1]
  if channels in (2, 4):  # LA / RGBA.
    color = x[..., :channels - 1]
    color = np.repeat(color, 3, axis=-1) if channels == 2 else color
    return _composite_on_white(np.concatenate([color, x[..., -1:]], axis=-1))
  if channels == 1:
    return np.repeat(x, 3, axis=-1)
  return np.ascontiguousarray(x)


def _orientation(img: Image.Image) -> int:
  """The EXIF orientation (1..8) `ImageOps.exif_transpose` would apply; 1 when none
  or when the EXIF block cannot be read."""
  try:
    orientation = img.getexif().get(0x0112, 1)
    return orientation if orientation in _ORIENTATIONS else 1
  except Exception:  # pylint: disable=broad-except
    return 1


def _oriented(img: Image.Image):
  """`img` with its EXIF orientation applied (as `ImageOps.exif_transpose`; a broken
  EXIF block keeps it unrotated) -> (image, orientation applied: 1 = none). Skips
  exif_transpose's copy when there is nothing to turn."""
  orientation = _orientation(img)
  if orientation == 1:
    return img, 1
  try:
    return ImageOps.exif_transpose(img) or img, orientation
  except Exception:  # pylint: disable=broad-except
    return img, 1  # A broken EXIF block should not cost the image: keep it unrotated.


def _to_rgb(img: Image.Image) -> Union[Image.Image, np.ndarray]:
  """Decoded PIL image (any mode) -> an RGB PIL image, or a uint8 [H, W, 3] array for
  the modes mapped through numpy (alpha on white, 16-bit, int, float)."""
  mode = img.mode
  if mode in _ALPHA_MODES or (mode in ("L", "P", "RGB") and "transparency" in img.info):
    return _composite_on_white(np.asarray(img.convert("RGBA")))
  if mode == "RGB":
    return img
  if mode in ("L", "P", "1", "CMYK", "YCbCr", "HSV"):
    return img.convert("RGB")
  if mode.startswith("I;16"):
    return _array_to_rgb(np.asarray(img).astype(np.uint16))
  if mode in ("I", "F"):
    return _array_to_rgb(np.asarray(img))
  try:
    return img.convert("RGB")
  except (ValueError, OSError) as e:
    raise BadRecord("unreadable", f"cannot convert mode {mode} to RGB ({e})") from e


def _rgb_image(img: Image.Image) -> Image.Image:
  """Decoded, oriented PIL image (any mode) -> RGB PIL image."""
  out = _to_rgb(img)
  return out if isinstance(out, Image.Image) else Image.fromarray(out)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
  """Decoded PIL image (any mode) -> uint8 [H, W, 3], EXIF orientation applied."""
  if img.width == 0 or img.height == 0:
    raise BadRecord("zero_size", f"image has size {img.size}")
  out = _to_rgb(_oriented(img)[0])
  return np.asarray(out) if isinstance(out, Image.Image) else out


def _error_kind(error: Exception) -> str:
  """'truncated' for errors that say the data ended early, else 'unreadable'."""
  text = str(error).lower()
  if isinstance(error, EOFError) or "truncated" in text or "premature" in text:
    return "truncated"
  return "unreadable"


def _open_header(data: bytes) -> Image.Image:
  """Opens `data` reading only its header; failures raise BadRecord."""
  if not data:
    raise BadRecord("empty", "image data is empty")
  try:
    img = Image.open(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecord(_error_kind(e), f"cannot identify image ({e})") from e
  if img.width == 0 or img.height == 0:
    raise BadRecord("zero_size", f"image has size {img.size}")
  return img


def _load(img: Image.Image) -> Image.Image:
  """Decodes an opened image's pixels; failures raise BadRecord."""
  try:
    img.load()  # Decoding happens here; truncated data fails here.
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecord(_error_kind(e), f"cannot decode {img.format} image ({e})") from e
  return img


def _open_bytes(data: bytes) -> Image.Image:
  """Opens and fully decodes `data`; failures raise BadRecord."""
  return _load(_open_header(data))


def decode_image(data: Union[bytes, np.ndarray, Image.Image]) -> np.ndarray:
  """Encoded bytes (JPEG/PNG/WebP/GIF/...), a PIL image or an array -> uint8 [H, W, 3].

  Raises BadRecord (kind 'empty', 'unreadable', 'truncated' or 'zero_size').
  """
  data = _as_bytes(data)
  if isinstance(data, bytes):
    return _pil_to_rgb(_open_bytes(data))
  if isinstance(data, Image.Image):
    try:
      data.load()
    except Exception as e:  # pylint: disable=broad-except
      raise BadRecord(_error_kind(e), str(e)) from e
    return _pil_to_rgb(data)
  if isinstance(data, np.ndarray):
    if data.dtype.kind not in "biuf":
      raise BadRecord("unreadable", f"image array has dtype {data.dtype}")
    return _array_to_rgb(data)
  if data is None:
    raise BadRecord("empty", "image is None")
  raise BadRecord("unreadable", f"cannot decode an image from {type(data).__name__}")


def _as_bytes(data):
  """bytes for bytes-like data (and a 1-element bytes array); anything else as is."""
  if isinstance(data, np.ndarray) and data.dtype.kind in "SO" and data.size == 1:
    data = data.item()  # A 0-d / 1-element bytes array from a columnar source.
  if isinstance(data, (bytearray, memoryview)):
    data = bytes(data)
  return data


class Decoded:
  """A decoded RGB PIL `image` of a picture whose full-resolution (EXIF-oriented) size
  is `size` (width, height); `image` may be a 1/`reduce` scale decode. `box(b)` maps a
  (left, top, right, bottom) box of the full picture into `image`'s coordinates."""

  def __init__(self, image: Image.Image, size, reduce: int = 1, offset=(0.0, 0.0)):
    self.image, self.size, self.reduce, self.offset = image, tuple(size), reduce, offset

  def box(self, box):
    if self.reduce == 1:
      return box
    (ox, oy), a, (w, h) = self.offset, self.reduce, self.image.size
    return (max(0.0, box[0] / a + ox), max(0.0, box[1] / a + oy),
            min(float(w), box[2] / a + ox), min(float(h), box[3] / a + oy))

  def resize(self, box, size: int) -> Image.Image:
    """The full-resolution `box` resized to size x size (bicubic)."""
    return self.image.resize((size, size), Image.BICUBIC, box=self.box(box))


class OpenImage:
  """An image whose header is read (`size`: full-resolution, EXIF-oriented (width,
  height)) and whose pixels are decoded by `decode(reduce)`: a JPEG (`max_reduce` 8)
  is decoded at 1/reduce scale in the DCT domain (Pillow's `Image.draft`), anything
  else (`max_reduce` 1) at full size. Built by `open_image`."""

  def __init__(self, data, img: Image.Image = None, decoded: Decoded = None):
    self._data, self._img, self._decoded = data, img, decoded
    if decoded is not None:
      self.size, self.max_reduce = decoded.size, 1
    else:
      swap = _ORIENTATIONS[_orientation(img)][0]
      self.size = img.size[::-1] if swap else img.size
      self.max_reduce = REDUCTIONS[0]

  def decode(self, reduce: int = 1) -> Decoded:
    """The pixels at 1/`reduce` scale (reduce in REDUCTIONS, <= max_reduce; the
    largest such scale whose size is exact, else full size). Raises BadRecord."""
    if self._decoded is not None:
      return self._decoded
    img, self._img = self._img, None
    if img is None:  # Decoded before: a draft cannot be undone, so open again.
      img = _open_header(self._data)
    raw = img.size
    if reduce > 1:
      want = (-(-raw[0] // reduce), -(-raw[1] // reduce))
      img.draft(None, (raw[0] // reduce, raw[1] // reduce))
      if img.size != want:  # Not the DCT scale asked for: decode at full size.
        img, reduce = _open_header(self._data), 1
    img, orientation = _oriented(_load(img))
    swap, flip_x, flip_y = _ORIENTATIONS[orientation]
    full = raw[::-1] if swap else raw
    offset = (0.0, 0.0)
    if reduce > 1:  # Reversed axes start with the padding of a partial DCT block.
      offset = (img.size[0] - full[0] / reduce if flip_x else 0.0,
                img.size[1] - full[1] / reduce if flip_y else 0.0)
    return Decoded(_rgb_image(img), full, reduce, offset)


def open_image(data: Union[bytes, np.ndarray, Image.Image]) -> OpenImage:
  """Encoded bytes, a PIL image or an array -> `OpenImage`. JPEG bytes are only
  opened (header read); everything else is decoded here like `decode_image`.
  Raises BadRecord (kinds as `decode_image`)."""
  data = _as_bytes(data)
  if isinstance(data, bytes):
    img = _open_header(data)
    if img.format == "JPEG" and len(getattr(img, "tile", ())) == 1:
      return OpenImage(data, img)
    rgb = _rgb_image(_oriented(_load(img))[0])  # (_open_header checked the size)
  elif isinstance(data, np.ndarray) and data.dtype == np.uint8 and (
      data.ndim == 3 and data.shape[-1] == 3 and data.shape[0] and data.shape[1]):
    rgb = Image.fromarray(data)
  else:
    rgb = Image.fromarray(decode_image(data))
  return OpenImage(data, decoded=Decoded(rgb, rgb.size))


def read_file(path: Union[str, os.PathLike]) -> bytes:
  """The bytes of the file at `path`; BadRecord('missing_file') if absent,
  BadRecord('unreadable') if it cannot be read."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise BadRecord("missing_file", f"no such file: '{path}'") from e
  except (IsADirectoryError, PermissionError) as e:
    raise BadRecord("unreadable", f"cannot read '{path}' ({e})") from e


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
  """Reads and decodes the image file at `path`; BadRecord('missing_file') if absent."""
  data = read_file(path)
  try:
    return decode_image(data)
  except BadRecord as e:
    raise BadRecord(e.kind, f"{path}: {e.message}") from e


def clean_captions(text: Any) -> List[str]:
  """str or list -> non-empty stripped captions; BadRecord('bad_caption') if none.

  Non-string entries are dropped (bytes are decoded as UTF-8 first).
  """
  items = [text] if isinstance(text, (str, bytes)) else text
  if isinstance(items, np.ndarray):
    items = items.reshape(-1).tolist()
  try:
    items = list(items)
  except TypeError:
    items = []
  captions = []
  for item in items:
    if isinstance(item, bytes):
      item = item.decode("utf-8", errors="replace")
    if isinstance(item, str) and item.strip():
      captions.append(item.strip())
  if not captions:
    raise BadRecord("bad_caption", f"no usable caption in {str(text)[:100]!r}")
  return captions
