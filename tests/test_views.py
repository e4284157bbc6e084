"""config.data.views / .text_views: K image crops per named group and caption forms
per example (vlp_jax/data/views.py), with the pipeline's guarantees kept: seeded per
(example, view), the same for any process count and worker count, bad records
replaced, exact resume; sharded like every batch entry and given only to objectives
that declare them."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import datagen
from vlp_jax import batch_plan, cli, config as config_lib, errors, sharding
from vlp_jax.data import batches, pipeline, robust, tokenizers, transforms, views
from vlp_jax.objectives import combine
from vlp_jax.registry import OBJECTIVES
from vlp_jax.train import accumulate, step as step_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizers.get_tokenizer("bytes")
VIEWS = {"global": {"count": 2, "size": 16, "crop_scale": [0.4, 1.0], "flip": True,
                    "boxes": True},
         "local": {"count": 3, "size": 8, "crop_scale": [0.05, 0.4]}}
TEXT_VIEWS = {"short": {"kind": "first_words", "words": 2},
              "drop": {"kind": "word_deletion", "p": 0.5}}
VIEW_KEYS = ("views/global", "view_boxes/global", "views/local", "text_views/drop",
             "text_views/short")
ALL_KEYS = batches.BATCH_KEYS + VIEW_KEYS


def small_config(source, batch_size=4, k=1, views_=VIEWS, text_views=TEXT_VIEWS,
                 **data):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.batch_size = batch_size
  c.data.update(source=source, image_size=16, tokenizer="bytes", captions_per_image=k,
                crop_scale=[0.5, 1.0], max_bad_fraction=0.5)
  c.data.update(data)
  c.data.views, c.data.text_views = views_, text_views
  c.model.text.context_length = 12
  return c


def take(config, n, plan=None, state=None):
  it = iter(pipeline.train_dataset(config, TOKENIZER, plan))
  if state is not None:
    it.set_state(state)
  out = [pipeline.split_bad_counts(next(it)) for _ in range(n)]
  state = it.get_state()
  if hasattr(it, "close"):
    it.close()
  return [b for b, _ in out], [s for _, s in out], state


def assert_same(a, b, keys=ALL_KEYS):
  for x, y in zip(a, b, strict=True):
    for key in keys:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("views")
  return {"jsonl": "jsonl:" + datagen.write_jsonl(str(root / "j"), 20, "j one two three",
                                                  bad={3, 11}),
          "wds": "wds:" + datagen.write_wds(str(root / "w"), 2, 6)}


# --- The transform.

ELEMENT = {"image": np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8),
           "text": ["one two three. four five six", "seven eight nine ten"], "key": "x"}


def transform(k=1, **kw):
  kw = {"image_views": views.image_views(config_lib.ConfigDict(
            {"views": VIEWS, "image_size": 16})),
        "text_views": views.text_views(config_lib.ConfigDict({"text_views": TEXT_VIEWS})),
        **kw}
  return transforms.TrainTransform(TOKENIZER, 16, 12, "unit", crop_scale=(0.5, 1.0),
                                   captions_per_image=k, **kw)


def test_views_add_keys_and_leave_the_example_unchanged():
  for k in (1, 2):
    plain = transforms.TrainTransform(TOKENIZER, 16, 12, "unit", crop_scale=(0.5, 1.0),
                                      captions_per_image=k)
    want = plain.random_map(ELEMENT, np.random.default_rng(7))
    got = transform(k).random_map(ELEMENT, np.random.default_rng(7))
    assert set(got) == set(want) | set(VIEW_KEYS)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
    rows = () if k == 1 else (k,)
    assert got["views/global"].shape == rows + (2, 16, 16, 3)
    assert got["views/local"].shape == rows + (3, 8, 8, 3)
    assert got["view_boxes/global"].shape == rows + (2, 4)
    assert got["text_views/short"].shape == rows + (12,)
    assert got["views/local"].dtype == np.float32
    assert got["text_views/short"].dtype == np.int32
  # Every crop of every row is its own.
  local = got["views/local"].reshape(-1, 8 * 8 * 3)
  assert len({row.tobytes() for row in local}) == 6
  # The caption forms are of each row's own caption.
  captions = [TOKENIZER.decode(t) for t in got["text"]]
  shorts = [TOKENIZER.decode(t) for t in got["text_views/short"]]
  assert shorts == [" ".join(c.split()[:2]) for c in captions]


def test_boxes_say_where_each_crop_lies():
  view = views.ImageView("g", 1, 8, (0.2, 0.6), (0.75, 1.33), flip=True, boxes=True)
  image = ELEMENT["image"]
  flipped = 0
  for seed in range(12):
    out, box = views.crop(image, view, np.random.default_rng(seed))
    x0, y0, x1, y1 = box * np.array([48, 40, 48, 40])
    flipped += x0 > x1
    left, right = min(x0, x1), max(x0, x1)
    want = np.asarray(Image.fromarray(image).resize(
        (8, 8), Image.BICUBIC, box=tuple(round(float(v)) for v in (left, y0, right, y1))))
    np.testing.assert_array_equal(out, want[:, ::-1] if x0 > x1 else want)
    area = (right - left) * (y1 - y0) / (48 * 40)
    assert 0.15 < area < 0.65
  assert 0 < flipped < 12


def test_photometric_options_change_colours_not_geometry():
  import dataclasses  # pylint: disable=g-import-not-at-top
  plain = views.ImageView("g", 1, 16, (0.3, 1.0), (0.75, 1.33), flip=True)
  grey = dataclasses.replace(plain, grayscale=1.0)
  jitter = dataclasses.replace(plain, color_jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0,
                               blur=0.5)
  image = ELEMENT["image"]
  for seed in range(4):
    want, box = views.crop(image, plain, np.random.default_rng(seed))
    got, grey_box = views.crop(image, grey, np.random.default_rng(seed))
    np.testing.assert_array_equal(grey_box, box)
    np.testing.assert_array_equal(
        got, np.asarray(Image.fromarray(want).convert("L").convert("RGB")))
    got, jitter_box = views.crop(image, jitter, np.random.default_rng(seed))
    np.testing.assert_array_equal(jitter_box, box)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).mean() > 1
    again, _ = views.crop(image, jitter, np.random.default_rng(seed))
    np.testing.assert_array_equal(again, got)


def test_views_are_seeded_per_example_and_view():
  a = transform().random_map(ELEMENT, np.random.default_rng(1))
  b = transform().random_map(ELEMENT, np.random.default_rng(1))
  c = transform().random_map(ELEMENT, np.random.default_rng(2))
  assert_same([a], [b], VIEW_KEYS)
  assert not np.array_equal(a["views/local"], c["views/local"])
  # A group's crops do not depend on which other groups are configured.
  only_local = transform(image_views=views.image_views(config_lib.ConfigDict(
      {"views": {"local": VIEWS["local"]}, "image_size": 16})), text_views=())
  d = only_local.random_map(ELEMENT, np.random.default_rng(1))
  assert set(d) == set(batches.BATCH_KEYS) | {"views/local"}
  np.testing.assert_array_equal(d["views/local"], a["views/local"])


def test_text_view_kinds():
  caption = "A dog runs. It is brown! The end"
  assert views.first_sentence(caption) == "A dog runs."
  assert views.first_sentence("no end here", 2) == "no end"
  assert views.first_sentence("A dog runs.It is") == "A dog runs.It is"
  assert views.first_words(caption, 3) == "A dog runs."
  rng = np.random.default_rng
  assert views.word_deletion(caption, 0.0, rng(0)) == caption
  kept = [views.word_deletion(caption, 0.5, rng(s)).split() for s in range(20)]
  assert all(1 <= len(w) < 8 and all(x in caption.split() for x in w) for w in kept)
  assert len({" ".join(w) for w in kept}) > 5
  assert views.word_deletion(caption, 0.5, rng(3)) == views.word_deletion(
      caption, 0.5, rng(3))
  assert len(views.word_deletion("a b c", 0.999, rng(0)).split()) == 1


def test_bad_marker_passes_through_the_view_transform():
  out = robust.safe_transform(transform())({"image": b"garbage", "text": "a", "key": "z"},
                                           np.random.default_rng(0))
  assert robust.is_bad(out)


# --- The config.


def test_default_config_has_no_views(data):
  c = config_lib.default_config()
  assert not c.data.views and not c.data.text_views
  assert views.batch_shapes(c.data, 77) == {}
  c = small_config(data["jsonl"])
  config_lib.validate(c)
  assert views.batch_shapes(c.data, 12) == {
      "views/global": ((2, 16, 16, 3), "float32"), "view_boxes/global": ((2, 4), "float32"),
      "views/local": ((3, 8, 8, 3), "float32"), "text_views/drop": ((12,), "int32"),
      "text_views/short": ((12,), "int32")}


def test_full_entries_hold_every_key_for_command_line_overrides():
  entry = views.image_view_entry(count=8, size=96, crop_scale=[0.05, 0.4])
  assert set(entry) == set(views.VIEW_DEFAULTS) and entry["crop_scale"] == (0.05, 0.4)
  assert entry["flip"] is False and entry["count"] == 8
  assert views.text_view_entry(kind="first_words", words=3) == {
      "kind": "first_words", "words": 3, "p": 0.1}
  with pytest.raises(errors.ConfigKeyError, match="Did you mean 'crop_scale'"):
    views.image_view_entry(crop_scal=[0.1, 0.2])
  c = config_lib.default_config()
  c.data.views = {"local": entry}
  config_lib.validate(c)
  assert views.image_views(c.data)[0].crop_scale == (0.05, 0.4)


@pytest.mark.parametrize("field,value,error,match", [
    ("views", {"g": {"cout": 2}}, errors.ConfigKeyError,
     r"Unknown config key 'config.data.views.g.cout'. Did you mean 'count'\?"),
    ("views", {"g": {"count": 0}}, errors.ConfigError, r"views.g.count=0 must be an "
     r"integer >= 1"),
    ("views", {"g": {"crop_scale": [0.6, 0.2]}}, errors.ConfigError,
     r"views.g.crop_scale=\[0.6, 0.2\] is invalid: .*0 < a <= b <= 1"),
    ("views", {"g": {"crop_ratio": [0.0, 1.0]}}, errors.ConfigError, r"crop_ratio"),
    ("views", {"g": {"flip": 1}}, errors.ConfigTypeError, r"views.g.flip must be True"),
    ("views", {"g": {"color_jitter": [0.4, 0.4]}}, errors.ConfigError,
     r"views.g.color_jitter=\[0.4, 0.4\] is invalid: it must be four numbers"),
    ("views", {"g": {"grayscale": 2}}, errors.ConfigError,
     r"views.g.grayscale=2 must be a number in \[0, 1\]"),
    ("views", {"g": 3}, errors.ConfigTypeError, r"config.data.views.g must be a group"),
    ("text_views", {"s": {"kind": "summary"}}, errors.ConfigError,
     r"text_views.s.kind='summary' is not one of \['first_sentence'"),
    ("text_views", {"s": {"kind": "first_words"}}, errors.ConfigError,
     r"text_views.s.words=0 must be an integer >= 1"),
    ("text_views", {"s": {"kind": "word_deletion", "p": 1.0}}, errors.ConfigError,
     r"text_views.s.p=1.0 must be a number in \[0, 1\)"),
])
def test_bad_view_config_is_a_clear_error(field, value, error, match):
  c = config_lib.default_config()
  c.data[field] = value
  with pytest.raises(error, match=match):
    config_lib.validate(c)


# --- The pipeline's guarantees.


def test_batches_carry_views_with_the_batch_axis_first(data):
  got, stats, _ = take(small_config(data["jsonl"]), 3)
  for batch in got:
    assert set(batch) == set(ALL_KEYS)
    assert batch["views/global"].shape == (4, 2, 16, 16, 3)
    assert batch["views/local"].shape == (4, 3, 8, 8, 3)
    assert batch["view_boxes/global"].shape == (4, 2, 4)
    assert batch["text_views/short"].shape == (4, 12)
    for text, short in zip(batch["text"], batch["text_views/short"]):
      assert TOKENIZER.decode(short) == " ".join(TOKENIZER.decode(text).split()[:2])
  # The bad records (3 and 11) were replaced by whole examples, views included.
  assert stats[-1]["bad/unreadable"] >= 1
  # Without views the same stream gives the same base batches.
  plain, _, _ = take(small_config(data["jsonl"], views_={}, text_views={}), 3)
  assert all(set(b) == set(batches.BATCH_KEYS) for b in plain)
  assert_same(plain, got, batches.BATCH_KEYS)


def test_processes_build_their_rows_of_the_same_view_batches(data):
  config = small_config(data["jsonl"], batch_size=8, k=2)
  ref, _, _ = take(config, 3)
  assert ref[0]["views/local"].shape == (8, 3, 8, 8, 3)
  parts = [take(config, 3, batch_plan.make(8, process_count=2, process_index=p))[0]
           for p in range(2)]
  joined = [{key: np.concatenate([parts[0][b][key], parts[1][b][key]]) for key in ALL_KEYS}
            for b in range(3)]
  assert_same(joined, ref)


def test_resume_with_views(data):
  config = small_config(data["jsonl"])
  _, _, state = take(config, 2)
  want, _, _ = take(config, 4)
  got, _, _ = take(config, 2, state=state)
  assert_same(got, want[2:])


def test_worker_count_does_not_change_view_batches(data):
  config = small_config(data["jsonl"], batch_size=8, k=2)  # bad records, 2 rows each
  ref, _, _ = take(config, 3)
  config.data.worker_count = 2
  got, _, _ = take(config, 3)
  assert_same(got, ref)


def test_wds_streams_views(data):
  got, _, _ = take(small_config(data["wds"], shuffle_buffer=0), 2)
  for batch in got:
    assert set(batch) == set(ALL_KEYS) and batch["views/global"].shape[:2] == (4, 2)


# --- Sharding and the objective contract.


def _views_probe(outputs, batch, cfg):
  del cfg
  per_row = jnp.mean(outputs["image_emb"], -1) * jnp.mean(batch["views/local"],
                                                          (1, 2, 3, 4))
  loss = jnp.mean(per_row) + jnp.mean(batch["text_views/short"].astype(jnp.float32))
  return loss, {"loss": loss, "rows": jnp.float32(batch["views/local"].shape[0])}


OBJECTIVES.register("test_views_probe", replace=True, reads=("image_emb",),
                    batch_keys=("views/local", "text_views/short"))(_views_probe)


class _Model:
  """A stand-in model: image_emb = w * mean pixel of 'image' (what objectives see is
  the point here, not the model)."""

  def apply(self, variables, batch, train=True, rngs=None):
    del train, rngs
    mean = jnp.mean(batch["image"], axis=(1, 2, 3))
    return {"image_emb": variables["params"]["w"] * mean[:, None]}


def test_objectives_get_the_view_keys_they_declare(data):
  batch, _, _ = take(small_config(data["jsonl"], batch_size=4), 1)
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  batch = sharding.make_global_batch(batch[0], mesh)
  assert batch["views/global"].sharding.spec[0] == ("data", "fsdp")
  params = {"w": jnp.ones((3,))}
  probe = combine.from_registry("test_views_probe")
  rng = jax.random.PRNGKey(0)
  whole = step_lib.gradients(params, _Model(), [probe], batch, rng)
  micro = jax.jit(lambda p, b: step_lib.gradients(p, _Model(), [probe], b, rng,
                                                  accum_steps=2))(params, batch)
  assert whole[1]["test_views_probe/rows"] == 4
  assert micro[1]["test_views_probe/rows"] == 2  # a per-example objective: micro-batches
  np.testing.assert_allclose(micro[0]["w"], whole[0]["w"], rtol=1e-5)
  parts = accumulate.split_microbatches({"v": batch["views/local"]}, 2)["v"]
  assert parts.shape == (2, 2, 3, 8, 8, 3)
  np.testing.assert_array_equal(parts[1, 0], batch["views/local"][1])
  # An objective reading a view key it did not declare gets a clear error.

  def sneaky(outputs, b, cfg):
    del cfg
    return jnp.mean(outputs["image_emb"]) + jnp.mean(b["views/global"]), {}

  obj = combine.WeightedObjective("sneaky", sneaky, 1.0, {}, ("image_emb",))
  with pytest.raises(combine.InputError, match=r"'sneaky' read the batch entry "
                     r"'views/global' without declaring it"):
    combine.call(obj, {"image_emb": jnp.ones((4, 3))}, batch)


@pytest.mark.slow
def test_trainer_runs_with_views_and_the_probe_sees_them(tmp_path):
  """The real train loop (a tiny two-tower, 2 steps): view batches go through device
  prefetch and the jitted, sharded step; the probe objective reads them (its 'rows'
  metric)."""
  from tests import test_train  # pylint: disable=g-import-not-at-top
  from vlp_jax.train import loop, metric_writer  # pylint: disable=g-import-not-at-top
  config = test_train.tiny_config(total_steps=2)
  config.model.name, config.checkpoint_every = "two_tower", 0
  config.data.views = {"local": {"count": 2, "size": 16, "crop_scale": [0.05, 0.4]}}
  config.data.text_views = {"short": {"kind": "first_sentence", "words": 4}}
  config.objectives = {"clip": 1.0, "test_views_probe": 0.1}
  loop.run(config, str(tmp_path))
  rows = [r for r in metric_writer.read_metrics(str(tmp_path / "metrics.jsonl"))
          if "test_views_probe/rows" in r]
  assert [r["test_views_probe/rows"] for r in rows] == [8.0, 8.0]
  assert all(np.isfinite(r["loss"]) for r in rows)
