"""Robust image decoding and caption cleaning for (possibly dirty) web-scale records.

`decode_image` turns encoded bytes, a PIL image or an array into uint8 [H, W, 3] RGB:
EXIF orientation applied, alpha composited on white, palette / CMYK / 16-bit / int /
float modes mapped to 8-bit RGB. Records that cannot be used raise `BadRecord`, whose
`kind` is one of `KINDS` (the same kinds `robust.DropBad` counts).
"""
import io
import os
from typing import Any, List, Union

import numpy as np
from PIL import Image, ImageOps

KINDS = ("unreadable", "truncated", "empty", "zero_size", "missing_file", "bad_caption")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
  """Decoded PIL image (any mode) -> uint8 [H, W, 3], EXIF orientation applied."""
  if img.width == 0 or img.height == 0:
    raise BadRecord("zero_size", f"image has size {img.size}")
  try:
    img = ImageOps.exif_transpose(img) or img
  except Exception:  # pylint: disable=broad-except
    pass  # A broken EXIF block should not cost the image: keep it unrotated.
  mode = img.mode
  if mode in _ALPHA_MODES or (mode in ("L", "P", "RGB") and "transparency" in img.info):
    return _composite_on_white(np.asarray(img.convert("RGBA")))
  if mode == "RGB":
    return np.asarray(img)
  if mode in ("L", "P", "1", "CMYK", "YCbCr", "HSV"):
    return np.asarray(img.convert("RGB"))
  if mode.startswith("I;16"):
    return _array_to_rgb(np.asarray(img).astype(np.uint16))
  if mode in ("I", "F"):
    return _array_to_rgb(np.asarray(img))
  try:
    return np.asarray(img.convert("RGB"))
  except (ValueError, OSError) as e:
    raise BadRecord("unreadable", f"cannot convert mode {mode} to RGB ({e})") from e


def _error_kind(error: Exception) -> str:
  """'truncated' for errors that say the data ended early, else 'unreadable'."""
  text = str(error).lower()
  if isinstance(error, EOFError) or "truncated" in text or "premature" in text:
    return "truncated"
  return "unreadable"


def _open_bytes(data: bytes) -> Image.Image:
  """Opens and fully decodes `data`; failures raise BadRecord."""
  if not data:
    raise BadRecord("empty", "image data is empty")
  try:
    img = Image.open(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecord(_error_kind(e), f"cannot identify image ({e})") from e
  if img.width == 0 or img.height == 0:
    raise BadRecord("zero_size", f"image has size {img.size}")
  try:
    img.load()  # Decoding happens here; truncated data fails here.
  except Exception as e:  # pylint: disable=broad-except
    raise BadRecord(_error_kind(e), f"cannot decode {img.format} image ({e})") from e
  return img


def decode_image(data: Union[bytes, np.ndarray, Image.Image]) -> np.ndarray:
  """Encoded bytes (JPEG/PNG/WebP/GIF/...), a PIL image or an array -> uint8 [H, W, 3].

  Raises BadRecord (kind 'empty', 'unreadable', 'truncated' or 'zero_size').
  """
  if isinstance(data, np.ndarray) and data.dtype.kind in "SO" and data.size == 1:
    data = data.item()  # A 0-d / 1-element bytes array from a columnar source.
  if isinstance(data, (bytearray, memoryview)):
    data = bytes(data)
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


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
  """Reads and decodes the image file at `path`; BadRecord('missing_file') if absent."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise BadRecord("missing_file", f"no such file: '{path}'") from e
  except (IsADirectoryError, PermissionError) as e:
    raise BadRecord("unreadable", f"cannot read '{path}' ({e})") from e
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
