"""The streamed webdataset source: patterns, grouping, bad members, shard split, resume."""
import collections
import json
import tarfile

import numpy as np
import pytest

from tests import datagen
from tests.test_data_scale import captions, small_config, take
from vlp_jax import config as config_lib
from vlp_jax import validation
from vlp_jax import errors
from vlp_jax.data import robust, sources, sources_wds, transforms


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp("wds")
  pattern = datagen.write_wds(str(root), 4, 6, corrupt={(0, 5)}, no_caption={(2, 1)})
  return root, pattern


def test_expand_pattern_braces_lists_and_globs(shards):
  root, pattern = shards
  paths = [str(root / f"shard-{i:03d}.tar") for i in range(4)]
  assert sources_wds.expand_pattern(pattern) == paths
  assert sources_wds.expand_pattern(f"{paths[2]},{root}/shard-00{{0,1}}.tar") == [
      paths[2], paths[0], paths[1]]
  assert sources_wds.expand_pattern(f"{root}/shard-*.tar") == paths
  assert sources_wds.expand_braces("a{8..10}b") == ["a8b", "a9b", "a10b"]
  assert sources_wds.expand_braces("{00..02}") == ["00", "01", "02"]


def test_startup_errors_name_the_pattern_or_file(shards, tmp_path):
  missing = str(tmp_path / "none-{000..009}.tar")
  with pytest.raises(FileNotFoundError) as e:
    sources_wds.open_wds(missing, 0, 0, 0, 1)
  assert missing in str(e.value)
  bad = tmp_path / "bad.tar"
  bad.write_bytes(b"this is not a tar file" * 10)
  with pytest.raises(ValueError, match="not a readable tar") as e:
    sources_wds.open_wds(f"{shards[1]},{bad}", 0, 0, 0, 1)
  assert str(bad) in str(e.value)
  config = small_config("wds:" + missing)
  with pytest.raises(FileNotFoundError, match="none-"):
    take(config, 1)


def test_missing_shards_named_by_braces_or_lists_are_an_error(tmp_path):
  # {000..007} with half the shards missing used to train on the other half silently.
  datagen.write_wds(str(tmp_path), 4, 2)  # shard-000.tar .. shard-003.tar
  pattern = str(tmp_path / "shard-{000..007}.tar")
  with pytest.raises(errors.DataPathError) as e:
    sources_wds.expand_pattern(pattern)
  msg = str(e.value)
  assert "4 of the 8 webdataset shards" in msg and pattern in msg, msg
  for i in range(4, 8):
    assert f"'{tmp_path}/shard-{i:03d}.tar'" in msg, msg
  assert "shard-003.tar" not in msg and "glob" in msg, msg
  assert isinstance(e.value, FileNotFoundError)
  config = small_config("wds:" + pattern)  # the same error when training starts
  with pytest.raises(errors.DataPathError, match="4 of the 8"):
    take(config, 1)
  # Comma lists too; more than five missing are counted, not all listed.
  present = str(tmp_path / "shard-000.tar")
  with pytest.raises(errors.DataPathError, match=r"1 of the 2 .*'.*nope\.tar'"):
    sources_wds.expand_pattern(f"{present},{tmp_path}/nope.tar")
  with pytest.raises(errors.DataPathError, match=r"16 of the 20 .*and 11 more"):
    sources_wds.expand_pattern(str(tmp_path / "shard-{000..019}.tar"))
  # A glob keeps matching the shards that exist.
  assert len(sources_wds.expand_pattern(str(tmp_path / "shard-*.tar"))) == 4
  assert len(sources_wds.expand_pattern(str(tmp_path / "shard-{000..003}.tar"))) == 4


def test_members_are_grouped_by_key(shards):
  root, _ = shards
  samples = list(sources_wds.iter_samples(str(root / "shard-002.tar")))
  assert [k for k, _ in samples] == [f"002/{i:04d}" for i in range(6)]
  assert set(samples[0][1]) == {"jpg", "txt"} and set(samples[1][1]) == {"jpg"}
  assert set(samples[3][1]) == {"jpg", "json"}
  elements = [sources_wds.to_element("s.tar", k, f) for k, f in samples]
  assert elements[0]["text"] == "w 2 0" and elements[3]["text"] == "w 2 3"
  assert elements[1]["_bad"] == "bad_caption" and "s.tar:002/0001" in elements[1]["key"]
  # Skipping resumes at the right sample.
  assert [k for k, _ in sources_wds.iter_samples(str(root / "shard-002.tar"), 4)] == [
      "002/0004", "002/0005"]
  # Random-access view (evaluation / tools).
  src = sources.make_source("wds:" + shards[1], "validation", 0, 0, 16)
  assert len(src) == 24 and transforms.as_image_u8(src[0]["image"]).shape == (12, 16, 3)


def test_shards_split_across_processes_and_workers(shards):
  paths = sources_wds.expand_pattern(shards[1])
  for epoch in range(3):
    seen = []
    for p in range(2):
      for w in range(2):
        ds = sources_wds.WdsDataset(paths, seed=0, process_index=p, process_count=2)
        ds.set_slice(slice(w, None, 2))
        seen += ds.shards_for_epoch(epoch)
    assert sorted(seen) == paths  # each shard read by exactly one (process, worker)
  one = sources_wds.WdsDataset(paths, seed=0)
  orders = {tuple(one.shards_for_epoch(e)) for e in range(6)}
  assert len(orders) > 1  # shard order reshuffled per epoch
  too_many = sources_wds.WdsDataset(paths, process_index=0, process_count=8)
  too_many.set_slice(slice(1, None, 2))
  with pytest.raises(ValueError, match="at least one shard"):
    too_many.shards_for_epoch(0)


def test_train_stream_epochs_bad_members_and_determinism(shards):
  config = small_config("wds:" + shards[1], batch_size=2)
  config.data.shuffle_buffer = 6  # blocks align with the 24-sample epochs
  got, _ = take(config, 22)  # 44 examples = 2 epochs of 22 good samples
  first = [c for b in got[:11] for c in captions(b)]
  second = [c for b in got[11:] for c in captions(b)]
  good = {f"w {s} {i}" for s in range(4) for i in range(6)} - {"w 0 5", "w 2 1"}
  assert sorted(first) == sorted(good) and sorted(second) == sorted(good)
  assert first != second  # epoch reshuffle
  counts, seen = robust.summarize(got[-1])
  assert counts["unreadable"] + counts["truncated"] == 2  # corrupt image, twice
  assert counts["bad_caption"] == 2 and seen == 48
  again, _ = take(config, 22)
  for a, b in zip(got, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  config.seed = 1
  other, _ = take(config, 11)
  assert [c for b in other for c in captions(b)] != first


@pytest.mark.parametrize("k", [3, 7])
def test_train_stream_resumes_mid_block(shards, k):
  config = small_config("wds:" + shards[1], batch_size=3)
  config.data.shuffle_buffer = 4
  ref, _ = take(config, k + 4)
  _, state = take(config, k)
  assert '"in_block"' in json.dumps(state)  # the position is part of the state
  rest, _ = take(config, 4, state)
  for a, b in zip(rest, ref[k:]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_wds_with_two_workers(shards):
  # Same seed and worker count: same batches; each worker streams its own shards.
  config = small_config("wds:" + shards[1], batch_size=2)
  config.data.update(worker_count=2, shuffle_buffer=0)
  got, _ = take(config, 8)  # 16 examples: fewer than one epoch of either worker
  got_captions = [c for b in got for c in captions(b)]
  assert collections.Counter(got_captions).most_common(1)[0][1] == 1
  again, _ = take(config, 8)
  assert [c for b in again for c in captions(b)] == got_captions


def test_shuffle_buffer_is_validated():
  config = small_config()
  config.data.shuffle_buffer = -1
  with pytest.raises(ValueError, match="shuffle_buffer"):
    validation.validate(config)


def test_wds_in_a_mixture(shards, tmp_path):
  # A streamed source mixes with a random-access one (grain IterDataset.mix).
  arrayrecord = "arrayrecord:" + datagen.write_arrayrecord(str(tmp_path / "a"), 10)
  config = small_config(batch_size=5)
  config.data.mixture = (("wds:" + shards[1], 0.6), (arrayrecord, 0.4))
  got, state = take(config, 10)
  prefixes = collections.Counter(c.split()[0] for b in got for c in captions(b))
  assert abs(prefixes["w"] / 50 - 0.6) <= 0.04 and set(prefixes) == {"w", "a"}, prefixes
  more, _ = take(config, 2, state)
  ref, _ = take(config, 12)
  for a, b in zip(more, ref[10:]):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_damaged_shard_is_counted_and_resumes_past_it(tmp_path):
  pattern = datagen.write_wds(str(tmp_path), 2, 6)
  damaged = tmp_path / "shard-001.tar"
  with tarfile.open(damaged) as tar:
    cut = tar.getmember("001/0003.jpg").offset_data + 10
  damaged.write_bytes(damaged.read_bytes()[:cut])  # ends inside sample 3's image
  items = list(sources_wds.iter_samples(str(damaged)))
  assert [k for k, _ in items] == ["001/0000", "001/0001", "001/0002", ""]
  assert "_error" in items[-1][1]
  # Resuming after the error does not meet it again.
  assert list(sources_wds.iter_samples(str(damaged), 4)) == []
  config = small_config("wds:" + pattern, batch_size=2)
  config.data.shuffle_buffer = 0
  ref, _ = take(config, 8)
  counts, _ = robust.summarize(ref[-1])
  assert counts["unreadable"] >= 1
  _, state = take(config, 5)
  rest, _ = take(config, 3, state)
  for a, b in zip(rest, ref[5:]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
