"""config.data.normalize_on_device: uint8 images from the pipeline, normalised on device
by TrainSetup.global_batch; equal to host normalisation (views and k > 1 rows too),
the same data position, and the same global batch on 8 devices as on one."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import datagen
from vlp_jax import cli
from vlp_jax.data import pipeline, tokenizers, transforms
from vlp_jax.train import setup as setup_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizers.get_tokenizer("bytes")
VIEWS = {"global": {"count": 2, "size": 16, "crop_scale": [0.4, 1.0], "flip": True},
         "local": {"count": 3, "size": 8, "crop_scale": [0.05, 0.4]}}


def small_config(source, on_device, k=1, views=None, normalization="clip"):
  c = cli.load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  c.batch_size = 4
  c.data.update(source=source, image_size=16, tokenizer="bytes", captions_per_image=k,
                crop_scale=[0.5, 1.0], normalization=normalization,
                normalize_on_device=on_device)
  c.data.views = views or {}
  c.model.text.context_length = 12
  c.model.image.patch_size = 8
  c.model.image.depth = c.model.text.depth = c.model.decoder.depth = 1
  return c


def take(config, n, state=None):
  it = iter(pipeline.train_dataset(config, TOKENIZER))
  if state is not None:
    it.set_state(state)
  out = [pipeline.split_bad_counts(next(it))[0] for _ in range(n)]
  return out, it.get_state()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return "jsonl:" + datagen.write_jsonl(str(tmp_path_factory.mktemp("dn")), 12)


_SETUPS = {}


def get_setup(source, normalization="clip"):
  """One TrainSetup per normalisation kind (models are built once per module)."""
  if normalization not in _SETUPS:
    _SETUPS[normalization] = setup_lib.TrainSetup(
        small_config(source, True, normalization=normalization))
  return _SETUPS[normalization]


@pytest.mark.parametrize("k, views, normalization", [(1, None, "clip"),
                                                     (2, VIEWS, "inception")])
def test_device_normalisation_equals_the_host_one(source, k, views, normalization):
  host, host_state = take(small_config(source, False, k, views, normalization), 2)
  raw, raw_state = take(small_config(source, True, k, views, normalization), 2)
  assert raw_state == host_state  # the data position does not depend on the flag
  setup = get_setup(source, normalization)
  image_keys = ["image"] + sorted(k for k in host[0] if k.startswith("views/"))
  assert len(image_keys) == (3 if views else 1)
  for h, r in zip(host, raw):
    assert sorted(h) == sorted(r)
    for key in h:
      if key in image_keys:
        assert r[key].dtype == np.uint8 and h[key].dtype == np.float32, key
        assert r[key].shape == h[key].shape, key
        np.testing.assert_allclose(transforms.normalize(r[key], normalization), h[key],
                                   atol=1e-6, rtol=0)
      else:
        np.testing.assert_array_equal(r[key], h[key], err_msg=key)
    on_device = setup.global_batch(r)
    for key in image_keys:
      got = np.asarray(on_device[key])
      assert got.dtype == np.float32 and got.shape == h[key].shape, key
      np.testing.assert_allclose(got, h[key], atol=1e-6, rtol=0, err_msg=key)
    np.testing.assert_array_equal(np.asarray(on_device["text"]), h["text"])
  if k == 2:
    assert host[0]["image"].shape == (4, 16, 16, 3)  # 2 examples x 2 rows


def test_float_batches_pass_through_unchanged(source):
  setup = get_setup(source)
  batch = {"image": np.random.default_rng(0).standard_normal((4, 16, 16, 3), np.float32),
           "text": np.ones((4, 12), np.int32)}
  out = setup.global_batch(batch)
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  assert setup_lib.is_raw_image("views/x", np.zeros(1, np.uint8))
  assert not setup_lib.is_raw_image("text", np.zeros(1, np.uint8))


def test_resume_continues_the_same_normalised_stream(source):
  """A checkpoint's data position (taken with either setting) resumes the stream."""
  config = small_config(source, True)
  whole, _ = take(config, 3)
  _, after_one = take(small_config(source, False), 1)
  resumed, _ = take(config, 2, state=after_one)
  for a, b in zip(whole[1:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


_MULTI = textwrap.dedent("""
    import json, sys, types
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests import test_device_normalize as t
    from vlp_jax import sharding
    from vlp_jax.train import setup as setup_lib
    config = t.small_config(sys.argv[2], True, k=2, views=t.VIEWS)
    config.batch_size = 8
    host, _ = t.take(config, 1)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
      # TrainSetup.global_batch reads only these (no model is built here).
      fake = types.SimpleNamespace(mesh=sharding.make_mesh({"data": -1}, devices),
                                   rules=sharding.DEFAULT_RULES, config=config,
                                   _normalize=None)
      b = setup_lib.TrainSetup.global_batch(fake, host[0])
      out[name] = {k: np.asarray(v).tolist() for k, v in b.items()
                   if k == "image" or k.startswith("views/")}
      out[name + "_shards"] = len(b["image"].addressable_shards)
    out["host"] = {k: t.transforms.normalize(v, "clip").tolist()
                   for k, v in host[0].items() if k == "image" or k.startswith("views/")}
    print(json.dumps(out))
    """)


def test_eight_devices_give_the_single_device_batch(source):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MULTI, ROOT, source], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["one_shards"] == 1 and out["eight_shards"] == 8
  assert sorted(out["one"]) == ["image", "views/global", "views/local"]
  for key in out["one"]:
    np.testing.assert_array_equal(out["eight"][key], out["one"][key], err_msg=key)
    np.testing.assert_allclose(out["one"][key], out["host"][key], atol=1e-6, rtol=0)
