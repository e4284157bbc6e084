"""Reduced-size JPEG decoding (DCT scaling via Pillow's draft) in the transforms.

The draft path (encoded JPEG bytes) is compared with the full path (the same JPEG
decoded to an array first): same crop boxes and random draws, pixels equal within
resampling error. Images are generated, textured and asymmetric, with sides that are
not multiples of 8, so a wrong box offset or scale shows up as a large difference.
"""
import io

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import decode, robust, sources, tokenizers, transforms, views
from vlp_jax.data.decode import BadRecord

# Mean / max absolute difference (uint8 units) allowed between the reduced and the
# full decode of the same crop: the two resample different pixels (DCT-domain
# averaging vs bicubic antialiasing), so they differ a little. Measured: mean <= 0.7,
# max <= 20 (at sharp edges). Boxes off by half a reduced pixel or by a reversed
# axis's padding give mean 1.05-5; mapped with the reduced / full size ratio instead
# of the DCT scale, mean ~3 at 1/8 scale.
MEAN_TOL, MAX_TOL = 1.0, 32


def _photo(h, w, seed=0):
  """A photo-like uint8 [h, w, 3]: smooth colour fields, oriented stripes of several
  frequencies, blobs, mild noise, and a bright marker square near the top-left
  corner (so mirrored / shifted crops differ)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  img = np.zeros((h, w, 3), np.float32)
  for c in range(3):
    fx, fy = rng.uniform(0.01, 0.08, size=2)
    img[..., c] = 110 + 50 * np.sin(fx * x + 0.7 * c) * np.cos(fy * y - 0.3 * c)
    img[..., c] += 40 * (x / w) * (c - 1) + 30 * (y / h)
  for _ in range(12):
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 0.2 * min(h, w))
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    img += blob[..., None] * rng.uniform(-70, 70, size=3)
  img += rng.normal(0, 4, size=img.shape)
  img[h // 10:h // 10 + h // 8, w // 12:w // 12 + w // 8] = (250, 30, 30)
  return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr, orientation=1, quality=92):
  """JPEG bytes of `arr` (stored as given) with an EXIF orientation tag."""
  img = Image.fromarray(arr)
  buf = io.BytesIO()
  if orientation != 1:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
  else:
    img.save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizers.get_tokenizer("bytes")


def _pair(transform, data, seed):
  """(draft output, full-decode output, rng states after each) of one example."""
  rngs = [np.random.default_rng(seed), np.random.default_rng(seed)]
  outs = [transform.random_map({"image": image, "text": ["a", "b", "c"], "key": "k"},
                               rng)
          for image, rng in zip((data, decode.decode_image(data)), rngs)]
  return outs[0], outs[1], [r.bit_generator.state for r in rngs]


def _diff(a, b):
  d = np.abs(a.astype(np.float64) - b.astype(np.float64))
  return d.mean(), d.max()


@pytest.mark.parametrize("h,w", [(301, 437), (517, 389)])
@pytest.mark.parametrize("crop_scale", [(0.08, 1.0), (0.9, 1.0), (1.0, 1.0)])
def test_draft_equals_full_decode_within_resampling_error(tokenizer, h, w, crop_scale):
  data = _jpeg(_photo(h, w, seed=h))
  transform = transforms.TrainTransform(tokenizer, 32, 8, "unit", crop_scale=crop_scale,
                                        captions_per_image=3, normalize_on_host=False)
  reduced = 0
  for seed in range(4):
    draft, full, states = _pair(transform, data, seed)
    assert states[0] == states[1]  # The same draws.
    np.testing.assert_array_equal(draft["text"], full["text"])
    mean, worst = _diff(draft["image"], full["image"])
    assert mean < MEAN_TOL and worst <= MAX_TOL, (seed, mean, worst)
    reduced += not np.array_equal(draft["image"], full["image"])
  assert reduced  # Some crops were decoded at a reduced scale.


def test_box_mapping_error_would_show():
  """Boxes mapped half a reduced pixel off, or with the size ratio (77 / 611) instead
  of the DCT scale (1 / 8), exceed the tolerances: they catch mapping mistakes."""
  arr = _photo(403, 611, seed=3)
  data = _jpeg(arr)
  full = decode.Decoded(Image.fromarray(decode.decode_image(data)), (611, 403))
  draft = decode.open_image(data).decode(8)
  assert draft.reduce == 8 and draft.image.size == (77, 51)  # ceil(611 / 8), ceil(403 / 8)
  box = (0, 0, 611, 403)
  want = np.asarray(full.resize(box, 24))
  mean, worst = _diff(np.asarray(draft.resize(box, 24)), want)
  assert mean < MEAN_TOL and worst <= MAX_TOL
  for wrong in ((0.5, 0.5, 611 / 8, 403 / 8), (0, 0, 77, 51)):
    got = np.asarray(draft.image.resize((24, 24), Image.BICUBIC, box=wrong))
    mean, worst = _diff(got, want)
    assert mean > 2 * MEAN_TOL, (wrong, mean, worst)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations(orientation):
  """Every EXIF orientation: the header size is the oriented size, and each reduced
  decode matches the full one (axes that swap or reverse put the partial DCT block's
  padding elsewhere)."""
  data = _jpeg(_photo(203, 333, seed=orientation), orientation)
  full = decode.decode_image(data)
  opened = decode.open_image(data)
  assert opened.size == (full.shape[1], full.shape[0])
  w, h = opened.size
  box = (w // 7, h // 9, w - w // 5, h - h // 11)  # Asymmetric margins.
  want = np.asarray(decode.Decoded(Image.fromarray(full), (w, h)).resize(box, 16))
  for reduce in (2, 4, 8):
    got = decode.open_image(data).decode(reduce)
    assert got.size == (w, h) and got.reduce == reduce
    mean, worst = _diff(np.asarray(got.resize(box, 16)), want)
    assert mean < MEAN_TOL and worst <= MAX_TOL, (reduce, mean, worst)


def test_reduction_keeps_every_crop_at_output_size():
  opened = decode.open_image(_jpeg(_photo(400, 640)))
  assert opened.max_reduce == 8
  assert transforms.reduction(opened, [((0, 0, 640, 400), 224)]) == 1  # 400 / 2 < 224
  assert transforms.reduction(opened, [((0, 0, 100, 90), 224)]) == 1  # Upsampled.
  assert transforms.reduction(opened, [((0, 0, 640, 400), 200)]) == 2
  assert transforms.reduction(opened, [((0, 0, 640, 400), 50)]) == 8
  assert transforms.reduction(opened, [((0, 0, 640, 400), 50),
                                       ((0, 0, 120, 300), 32)]) == 2  # The smallest box.
  png = io.BytesIO()
  Image.fromarray(_photo(400, 640)).save(png, format="PNG")
  assert decode.open_image(png.getvalue()).max_reduce == 1  # Non-JPEG: full size.
  assert transforms.reduction(decode.open_image(png.getvalue()),
                              [((0, 0, 640, 400), 50)]) == 1


def test_views_choose_a_scale_for_every_crop(tokenizer):
  """Views share the example's decode: the draws (boxes) are those of a full decode
  and every crop stays within resampling error."""
  image_views = (views.ImageView("g", 2, 32, (0.4, 1.0), (3 / 4, 4 / 3), flip=True,
                                 boxes=True),
                 views.ImageView("l", 3, 16, (0.05, 0.4), (3 / 4, 4 / 3), boxes=True))
  transform = transforms.TrainTransform(tokenizer, 32, 8, "unit", crop_scale=(0.5, 1.0),
                                        image_views=image_views,
                                        normalize_on_host=False)
  data = _jpeg(_photo(480, 720, seed=5))
  for seed in range(3):
    draft, full, states = _pair(transform, data, seed)
    assert states[0] == states[1]
    for name in ("g", "l"):
      np.testing.assert_array_equal(draft["view_boxes/" + name],
                                    full["view_boxes/" + name])
      mean, worst = _diff(draft["views/" + name], full["views/" + name])
      assert mean < MEAN_TOL and worst <= MAX_TOL, (name, mean, worst)


def test_crop_boxes_are_the_full_decode_boxes(tokenizer, monkeypatch):
  """The boxes asked of the decoded image are identical with and without draft."""
  asked = []
  real = decode.Decoded.resize
  monkeypatch.setattr(decode.Decoded, "resize",
                      lambda self, box, size: asked.append(box) or real(self, box, size))
  data = _jpeg(_photo(600, 900, seed=7))
  for crop_scale in ((0.08, 1.0), (1.0, 1.0)):
    transform = transforms.TrainTransform(tokenizer, 24, 8, "clip", crop_scale=crop_scale,
                                          flip=True, captions_per_image=2)
    runs = []
    for image in (data, decode.decode_image(data)):
      asked.clear()
      transform.random_map({"image": image, "text": "t", "key": "k"},
                           np.random.default_rng(11))
      runs.append(list(asked))
    assert runs[0] == runs[1] and runs[0]


def test_png_and_array_paths_are_unchanged(tokenizer):
  arr = _photo(90, 130)
  png = io.BytesIO()
  Image.fromarray(arr).save(png, format="PNG")
  transform = transforms.TrainTransform(tokenizer, 32, 8, "clip", crop_scale=(0.3, 1.0))
  a = transform.random_map({"image": arr, "text": "t", "key": "k"},
                           np.random.default_rng(0))
  b = transform.random_map({"image": png.getvalue(), "text": "t", "key": "k"},
                           np.random.default_rng(0))
  np.testing.assert_array_equal(a["image"], b["image"])
  # A small JPEG (no reduction possible) is bit-identical to its decoded array.
  data = _jpeg(arr)
  c = transform.random_map({"image": data, "text": "t", "key": "k"},
                           np.random.default_rng(0))
  d = transform.random_map({"image": decode.decode_image(data), "text": "t", "key": "k"},
                           np.random.default_rng(0))
  np.testing.assert_array_equal(c["image"], d["image"])


def test_eval_transform_draft(tokenizer):
  del tokenizer
  data = _jpeg(_photo(500, 700, seed=9))
  transform = transforms.EvalTransform(48, "unit")
  got = transform.map({"image": data, "text": "t"})["image"]
  want = transform.map({"image": decode.decode_image(data), "text": "t"})["image"]
  mean, worst = _diff(got * 255, want * 255)
  assert 0 < mean < MEAN_TOL and worst <= MAX_TOL


def test_center_crop_box_equals_resize_then_crop():
  arr = _photo(45, 70)
  for size in (20, 33, 45):
    h, w = arr.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    ref = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BICUBIC))[
        top:top + size, left:left + size]
    got = transforms.resize_center_crop(arr, size)
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_normalize_affine_and_uint8_flag(tokenizer):
  values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
  for kind in transforms.NORMALIZATIONS:
    mean, std = transforms.normalization_constants(kind)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == (3,)
    ref = (values.astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(transforms.normalize(values, kind), ref, rtol=0, atol=1e-6)
  data = _jpeg(_photo(300, 400))
  kwargs = dict(crop_scale=(0.2, 1.0), captions_per_image=2,
                image_views=(views.ImageView("v", 2, 16, (0.3, 1.0), (0.75, 1.33)),))
  host = transforms.TrainTransform(tokenizer, 32, 8, "clip", **kwargs)
  raw = transforms.TrainTransform(tokenizer, 32, 8, "clip", normalize_on_host=False,
                                  **kwargs)
  a = host.random_map({"image": data, "text": "t", "key": "k"}, np.random.default_rng(1))
  b = raw.random_map({"image": data, "text": "t", "key": "k"}, np.random.default_rng(1))
  assert b["image"].dtype == np.uint8 and b["views/v"].dtype == np.uint8
  assert set(a) == set(b)
  np.testing.assert_array_equal(transforms.normalize(b["image"], "clip"), a["image"])
  np.testing.assert_array_equal(transforms.normalize(b["views/v"], "clip"), a["views/v"])
  for key in ("text", "label", "data_type", "image_id"):
    np.testing.assert_array_equal(a[key], b[key])


def test_bad_records_keep_their_kinds(tokenizer, tmp_path):
  data = _jpeg(_photo(200, 300))
  transform = robust.safe_transform(transforms.TrainTransform(
      tokenizer, 16, 8, "clip", crop_scale=(0.08, 1.0)))
  evaluate = robust.safe_transform(transforms.EvalTransform(16, "clip"))
  cases = {"truncated": data[:len(data) // 2], "empty": b"",
           "unreadable": b"\xff\xd8\xff" + bytes(range(200)),
           "zero_size": np.zeros((0, 5, 3), np.uint8)}
  for kind, image in cases.items():
    element = {"image": image, "text": "t", "key": "k"}
    assert transform(element, np.random.default_rng(0))["_bad"] == kind, kind
    assert evaluate(element)["_bad"] == kind, kind
  # Missing files are found by the source, before any decoding.
  path = tmp_path / "c.jsonl"
  path.write_text('{"image": "missing.jpg", "caption": "x"}\n'
                  '{"image": "ok.jpg", "caption": "y"}\n')
  (tmp_path / "ok.jpg").write_bytes(data)
  src = robust.SafeSource(sources.make_source(f"jsonl:{path}", "train", 0, 0, 16), "j")
  assert src[0]["_bad"] == "missing_file"
  assert isinstance(src[1]["image"], bytes)
  assert transforms.as_image_u8(src[1]["image"]).shape == (200, 300, 3)
