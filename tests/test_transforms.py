"""Tests for robust image decoding, caption cleaning and the crop / train transforms."""
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import decode, tokenizers, transforms
from vlp_jax.data.decode import BadRecord


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_rgb(out, shape):
  assert out.dtype == np.uint8 and out.shape == shape + (3,)


# ---------------------------------------------------------------------------- decode


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("WEBP", {"lossless": True}),
                                        ("GIF", {}), ("JPEG", {"quality": 95})])
def test_decode_formats(fmt, kwargs):
  img = Image.new("RGB", (20, 12), (200, 30, 60))
  out = decode.decode_image(_encode(img, fmt, **kwargs))
  _check_rgb(out, (12, 20))
  tol = 8 if fmt == "JPEG" else (4 if fmt == "GIF" else 0)
  np.testing.assert_allclose(out.reshape(-1, 3).astype(int),
                             np.tile([200, 30, 60], (240, 1)), atol=tol)


def test_decode_rgb_array_and_pil_passthrough():
  arr = _noise(9, 7)
  np.testing.assert_array_equal(decode.decode_image(arr), arr)
  np.testing.assert_array_equal(decode.decode_image(Image.fromarray(arr)), arr)
  np.testing.assert_array_equal(decode.decode_image(_encode(Image.fromarray(arr), "PNG")),
                                arr)
  # A 0-d bytes array (columnar sources) and bytearray are accepted too.
  png = _encode(Image.fromarray(arr), "PNG")
  np.testing.assert_array_equal(decode.decode_image(np.array(png, dtype=object)), arr)
  np.testing.assert_array_equal(decode.decode_image(bytearray(png)), arr)


def test_decode_grayscale_and_la():
  gray = Image.fromarray(np.full((5, 6), 77, np.uint8), "L")
  out = decode.decode_image(_encode(gray, "PNG"))
  _check_rgb(out, (5, 6))
  assert (out == 77).all()
  # LA: alpha 0 -> white, alpha 255 -> the grey level, alpha 128 -> halfway.
  la = np.zeros((1, 3, 2), np.uint8)
  la[0, :, 1] = [0, 255, 128]
  out = decode.decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
  assert np.abs(out[0, 2].astype(int) - 127).max() <= 1
  # Grayscale arrays ([H, W] and [H, W, 1]) become RGB too.
  _check_rgb(decode.decode_image(np.full((4, 5), 9, np.uint8)), (4, 5))
  _check_rgb(decode.decode_image(np.full((4, 5, 1), 9, np.uint8)), (4, 5))


def test_decode_rgba_alpha_on_white():
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = [10, 20, 30, 0]  # Fully transparent -> white.
  rgba[0, 1] = [10, 20, 30, 255]  # Opaque -> unchanged.
  rgba[1, 0] = [0, 0, 0, 128]  # Half black over white -> mid grey.
  for data in (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgba,
               _encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True)):
    out = decode.decode_image(data)
    _check_rgb(out, (2, 2))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    assert np.abs(out[1, 0].astype(int) - 127).max() <= 1


def test_decode_palette_and_transparency():
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
  pal = Image.new("P", (3, 1))
  pal.putpalette([c for rgb in colours for c in rgb] + [0] * (768 - 9))
  pal.putdata([0, 1, 2])
  for fmt in ("PNG", "GIF"):
    out = decode.decode_image(_encode(pal, fmt))
    _check_rgb(out, (1, 3))
    np.testing.assert_array_equal(out[0], colours)
  # Palette index 1 marked transparent -> white.
  for fmt in ("PNG", "GIF"):
    out = decode.decode_image(_encode(pal, fmt, transparency=1))
    np.testing.assert_array_equal(out[0], [colours[0], (255, 255, 255), colours[2]])


def test_decode_cmyk_is_reddish():
  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # Pure red in CMYK.
  for data in (_encode(cmyk, "JPEG", quality=95), cmyk, _encode(cmyk, "TIFF")):
    out = decode.decode_image(data)
    _check_rgb(out, (8, 8))
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_decode_16_bit_gradient_is_monotonic():
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (3, 1))
  img = Image.fromarray(ramp)
  assert img.mode == "I;16"
  for data in (_encode(img, "PNG"), img, ramp):
    out = decode.decode_image(data)
    _check_rgb(out, (3, 64))
    row = out[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_decode_int_and_float_modes():
  ints = Image.fromarray((np.arange(16, dtype=np.int32) * 4000).reshape(2, 8))
  assert ints.mode == "I"
  out = decode.decode_image(_encode(ints, "TIFF"))
  _check_rgb(out, (2, 8))
  np.testing.assert_array_equal(out[0, :, 0], np.rint(np.arange(8) * 4000 / 257))
  floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(2, 8))
  assert floats.mode == "F"
  out = decode.decode_image(_encode(floats, "TIFF"))
  _check_rgb(out, (2, 8))
  assert out[0, 0, 0] == 0 and out[1, -1, 0] == 255
  assert (np.diff(out[..., 0].reshape(-1).astype(int)) >= 0).all()


def test_decode_applies_exif_orientation():
  arr = np.zeros((20, 40, 3), np.uint8)  # 20 high, 40 wide: left red, right blue.
  arr[:, :20] = [255, 0, 0]
  arr[:, 20:] = [0, 0, 255]
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  out = decode.decode_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
  _check_rgb(out, (40, 20))
  # Clockwise rotation: the left (red) half ends on top, the right (blue) at the bottom.
  assert out[0, 0, 0] > 200 and out[0, 0, 2] < 60
  assert out[-1, -1, 2] > 200 and out[-1, -1, 0] < 60
  expected = np.rot90(arr, k=-1)
  assert np.abs(out.astype(int) - expected).mean() < 5


def test_decode_bad_data_kinds():
  jpeg = _encode(Image.fromarray(_noise(96, 96)), "JPEG")
  with pytest.raises(BadRecord) as err:
    decode.decode_image(jpeg[:len(jpeg) // 2])
  assert err.value.kind in ("truncated", "unreadable")
  png = _encode(Image.fromarray(_noise(64, 64)), "PNG")
  with pytest.raises(BadRecord) as err:
    decode.decode_image(png[:len(png) // 2])
  assert err.value.kind in ("truncated", "unreadable")
  with pytest.raises(BadRecord) as err:
    decode.decode_image(np.random.default_rng(0).bytes(2000))
  assert err.value.kind == "unreadable"
  for empty in (b"", None):
    with pytest.raises(BadRecord) as err:
      decode.decode_image(empty)
    assert err.value.kind == "empty"
  for zero in (np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (0, 5))):
    with pytest.raises(BadRecord) as err:
      decode.decode_image(zero)
    assert err.value.kind == "zero_size"
  with pytest.raises(BadRecord) as err:
    decode.decode_image(np.zeros((4, 4, 5), np.uint8))
  assert err.value.kind == "unreadable"


def test_bad_record_is_value_error_and_pickles():
  err = BadRecord("truncated", "half a file")
  assert isinstance(err, ValueError) and err.kind == "truncated"
  assert "half a file" in str(err)
  again = pickle.loads(pickle.dumps(err))
  assert again.kind == "truncated" and str(again) == str(err)
  assert BadRecord("bad_caption").kind == "bad_caption"
  with pytest.raises(ValueError, match="Unknown bad-record kind"):
    BadRecord("mystery")


def test_load_image(tmp_path):
  arr = _noise(6, 9)
  path = tmp_path / "ok.png"
  Image.fromarray(arr).save(path)
  np.testing.assert_array_equal(decode.load_image(str(path)), arr)
  np.testing.assert_array_equal(decode.load_image(path), arr)
  with pytest.raises(BadRecord) as err:
    decode.load_image(str(tmp_path / "missing.jpg"))
  assert err.value.kind == "missing_file" and "missing.jpg" in str(err.value)
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(BadRecord) as err:
    decode.load_image(str(tmp_path / "empty.jpg"))
  assert err.value.kind == "empty" and "empty.jpg" in str(err.value)


def test_clean_captions():
  assert decode.clean_captions("  a dog \n") == ["a dog"]
  assert decode.clean_captions(["a", " ", "", None, 3, " b "]) == ["a", "b"]
  assert decode.clean_captions((b" bytes ", "c")) == ["bytes", "c"]
  assert decode.clean_captions(np.array(["x", " "])) == ["x"]
  for bad in ("", "   ", [], ["", " \t"], [None, 1], None, 5):
    with pytest.raises(BadRecord) as err:
      decode.clean_captions(bad)
    assert err.value.kind == "bad_caption"


# ------------------------------------------------------------------ random resized crop


def _coordinate_image(h, w):
  """uint8 image whose R channel is the column and G channel the row index."""
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = np.arange(w)[None, :]
  img[..., 1] = np.arange(h)[:, None]
  return img


def test_random_resized_crop_shape_and_determinism():
  img = _noise(50, 70)
  out = transforms.random_resized_crop(img, 32, np.random.default_rng(3))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  again = transforms.random_resized_crop(img, 32, np.random.default_rng(3))
  np.testing.assert_array_equal(out, again)
  others = [transforms.random_resized_crop(img, 32, np.random.default_rng(s), scale=(0.3, 1))
            for s in range(4, 8)]
  assert any(not np.array_equal(out, o) for o in others)


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.5)])
def test_random_resized_crop_respects_scale_and_ratio(scale):
  h = w = 100
  img = _coordinate_image(h, w)
  ratio = (3 / 4, 4 / 3)
  fractions = []
  for seed in range(40):
    # Upsampling (crop <= 100 px -> 200 px) keeps the sampled extent ~ the crop box.
    out = transforms.random_resized_crop(img, 200, np.random.default_rng(seed), scale, ratio)
    xs, ys = out[..., 0].astype(int), out[..., 1].astype(int)
    cw, ch = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert 0 <= xs.min() and xs.max() < w and 0 <= ys.min() and ys.max() < h
    fraction = cw * ch / (h * w)
    fractions.append(fraction)
    assert scale[0] - 0.04 <= fraction <= scale[1] + 0.02, (seed, cw, ch)
    assert ratio[0] - 0.05 <= cw / ch <= ratio[1] + 0.05, (seed, cw, ch)
  assert np.ptp(fractions) > 0.02  # The scale actually varies.


def test_random_resized_crop_fallback_is_center_crop():
  # A 10 x 200 strip: no crop of area >= 90% fits with w/h <= 4/3 -> ratio-clamped
  # center crop of 13 x 10 (cols 93..105).
  img = _coordinate_image(10, 200)
  for seed in range(3):
    out = transforms.random_resized_crop(img, 64, np.random.default_rng(seed))
    assert out.shape == (64, 64, 3)
    xs = out[..., 0].astype(int)
    assert 92 <= xs.min() <= 94 and 104 <= xs.max() <= 106
    ys = out[..., 1].astype(int)
    assert ys.min() <= 1 and ys.max() >= 8


def test_random_resized_crop_flip():
  img = _coordinate_image(40, 40)
  directions = set()
  for seed in range(16):
    out = transforms.random_resized_crop(img, 32, np.random.default_rng(seed), flip=True)
    directions.add(int(np.sign(int(out[16, -1, 0]) - int(out[16, 0, 0]))))
  assert directions == {-1, 1}
  for seed in range(8):  # flip=False (default) never mirrors.
    out = transforms.random_resized_crop(img, 32, np.random.default_rng(seed))
    assert out[16, -1, 0] > out[16, 0, 0]


# ---------------------------------------------------------------------- train / eval


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.get_tokenizer("bytes")


def _reference_train_map(element, rng, tokenizer, size, length, norm):
  """TrainTransform.random_map as it was before crop / flip / bytes support."""
  captions = transforms.as_caption_list(element["text"])
  caption = captions[rng.integers(len(captions))]
  image = transforms.resize_center_crop(element["image"], size)
  return {"image": transforms.normalize(image, norm),
          "text": tokenizer.tokenize([caption], length)[0]}


def test_train_transform_default_unchanged(tokenizer):
  element = {"image": _noise(45, 60), "text": ["one", "two", "three"], "key": "k"}
  transform = transforms.TrainTransform(tokenizer, 32, 16, "clip")
  for seed in range(5):
    out = transform.random_map(element, np.random.default_rng(seed))
    ref = _reference_train_map(element, np.random.default_rng(seed), tokenizer, 32, 16,
                               "clip")
    assert set(out) == {"image", "text", "label", "data_type", "image_id"}
    np.testing.assert_array_equal(out["image"], ref["image"])
    np.testing.assert_array_equal(out["text"], ref["text"])
  # Positional construction as used today still works; defaults are off.
  assert transform.crop_scale == (1.0, 1.0) and not transform.flip


def test_train_transform_bytes_equal_array(tokenizer):
  arr = _noise(45, 60)
  png = _encode(Image.fromarray(arr), "PNG")
  for kwargs in ({}, {"crop_scale": (0.5, 1.0), "flip": True}):
    transform = transforms.TrainTransform(tokenizer, 32, 16, "inception", **kwargs)
    for seed in range(3):
      from_arr = transform.random_map({"image": arr, "text": "a cat", "key": "k"},
                                      np.random.default_rng(seed))
      from_bytes = transform.random_map({"image": png, "text": "a cat", "key": "k"},
                                        np.random.default_rng(seed))
      np.testing.assert_array_equal(from_arr["image"], from_bytes["image"])
      np.testing.assert_array_equal(from_arr["text"], from_bytes["text"])
      assert from_arr["image"].shape == (32, 32, 3)


def test_train_transform_random_crop_and_clean_captions(tokenizer):
  img = _coordinate_image(100, 100)
  transform = transforms.TrainTransform(tokenizer, 32, 16, "unit", crop_scale=(0.3, 0.5))
  out = transform.random_map({"image": img, "text": "x", "key": "k"},
                             np.random.default_rng(0))
  xs = np.rint(out["image"][..., 0] * 255)
  assert out["image"].shape == (32, 32, 3) and np.ptp(xs) < 80  # A real crop.
  strict = transforms.TrainTransform(tokenizer, 32, 16, clean_captions=True)
  out = strict.random_map({"image": img, "text": ["", "  only one  "], "key": "k"},
                          np.random.default_rng(0))
  assert tokenizer.decode(out["text"]) == "only one"
  with pytest.raises(BadRecord) as err:
    strict.random_map({"image": img, "text": ["", " "], "key": "k"},
                      np.random.default_rng(0))
  assert err.value.kind == "bad_caption"


def test_eval_transform_accepts_bytes():
  arr = _noise(40, 50)
  transform = transforms.EvalTransform(24, "clip")
  from_arr = transform.map({"image": arr, "text": "t", "label": 3})
  from_bytes = transform.map({"image": _encode(Image.fromarray(arr), "PNG"), "text": "t",
                              "label": 3})
  np.testing.assert_array_equal(from_arr["image"], from_bytes["image"])
  assert from_bytes["text"] == ["t"] and from_bytes["label"] == 3
  expected = transforms.normalize(transforms.resize_center_crop(arr, 24), "clip")
  np.testing.assert_array_equal(from_arr["image"], expected)
  with pytest.raises(BadRecord):
    transform.map({"image": b"not an image", "text": "t"})
