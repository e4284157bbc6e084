"""Determinism at scale: worker/process-count invariant batches and weighted mixtures."""
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests import datagen
from vlp_jax import batch_plan, cli, config as config_lib, validation
from vlp_jax.data import batches, mixture, pipeline, robust, tokenizers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizers.get_tokenizer("bytes")


def small_config(source="shapes", batch_size=4, seed=0):
  c = cli.load_config_file(os.path.join(REPO_ROOT, "configs", "demo.py"))
  c.seed, c.batch_size = seed, batch_size
  c.data.update(source=source, image_size=16, tokenizer="bytes", max_bad_fraction=0.5)
  c.model.text.context_length = 12
  return c


def take(config, n, state=None):
  it = iter(pipeline.train_dataset(config, TOKENIZER))
  if state is not None:
    it.set_state(state)
  out = [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]
  state = it.get_state()
  if hasattr(it, "close"):
    it.close()
  return out, state


def captions(batch):
  return [TOKENIZER.decode(t) for t in batch["text"]]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == {*batches.BATCH_KEYS, "_bad_counts", "_seen"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("scale")
  return {
      "jsonl": "jsonl:" + datagen.write_jsonl(str(root / "j"), 24, "j", bad={3, 17}),
      "arrayrecord": "arrayrecord:" + datagen.write_arrayrecord(str(root / "a"), 20, "a"),
  }


def test_worker_count_does_not_change_batches(data):
  # A jsonl source with bad records and a mixture: 0 vs 2 worker processes.
  single = small_config(data["jsonl"])
  mixed = small_config()
  mixed.data.mixture = ((data["jsonl"], 0.5), (data["arrayrecord"], 0.5))
  for config in (single, mixed):
    ref, _ = take(config, 8)
    config.data.worker_count = 2
    got, _ = take(config, 8)
    assert_same(got, ref)
    assert len({c for b in ref for c in captions(b)}) > 12  # Many different records.
  # The bad records were met, replaced and counted identically in both runs.
  single.data.worker_count = 0
  batches_, _ = take(single, 8)
  counts, seen = robust.summarize(batches_[-1])
  assert counts["unreadable"] >= 2 and seen == 32 + counts["unreadable"]
  assert all(c.split()[1] not in ("3", "17") for b in batches_ for c in captions(b))


def test_process_count_does_not_change_the_global_batch(data):
  config = small_config(data["jsonl"], batch_size=8)
  source = robust.SafeSource(
      pipeline.sources.make_source(data["jsonl"], "train", 0, 0, 16), data["jsonl"])
  elements = pipeline.grain.MapDataset.source(source).seed(0).shuffle().repeat()
  elements = elements.random_map(pipeline._train_transform(config, TOKENIZER))  # pylint: disable=protected-access
  elements = batches.ReplaceBad(elements, len(source), 0)
  one = batches.ProcessBatches(elements, batch_plan.make(8))
  assert sum(len(one[b]["_skipped"]) for b in range(6)) >= 2  # bad records were met
  for num in (2, 4):
    parts = [batches.ProcessBatches(elements, batch_plan.make(8, process_count=num,
                                                            process_index=p))
             for p in range(num)]
    for b in range(6):
      local = [part[b] for part in parts]
      assert all(x["image"].shape[0] == 8 // num for x in local)
      for key in ("image", "text"):
        np.testing.assert_array_equal(np.concatenate([x[key] for x in local]),
                                      one[b][key])
      assert sum(x["_read"] for x in local) == one[b]["_read"]


def test_spare_index_is_seeded_and_stays_in_its_window():
  spares = [batches.spare_index(0, 25, a, 10) for a in range(1, 30)]
  assert all(20 <= s < 30 for s in spares) and len(set(spares)) > 3
  assert spares == [batches.spare_index(0, 25, a, 10) for a in range(1, 30)]
  assert spares != [batches.spare_index(1, 25, a, 10) for a in range(1, 30)]


def test_mixture_proportions_match_the_weights(data):
  config = small_config(batch_size=10)
  config.data.mixture = (f"{data['jsonl']}=0.7", f"{data['arrayrecord']}=0.3")
  got, _ = take(config, 30)
  prefixes = collections.Counter(c.split()[0] for b in got for c in captions(b))
  assert set(prefixes) == {"j", "a"}
  assert sum(prefixes.values()) == 300
  assert abs(prefixes["j"] / 300 - 0.7) <= 0.01, prefixes
  # Each component is itself shuffled: both cover their records evenly.
  per_record = collections.Counter(c for b in got for c in captions(b) if c[0] == "a")
  assert len(per_record) == 20 and max(per_record.values()) - min(per_record.values()) <= 1
  # Different weights, different proportions; same config, same batches.
  config.data.mixture = (f"{data['jsonl']}=0.2", f"{data['arrayrecord']}=0.8")
  other, _ = take(config, 10)
  share = np.mean([c[0] == "j" for b in other for c in captions(b)])
  assert abs(share - 0.2) <= 0.01


def test_mixture_resumes_from_state(data):
  config = small_config()
  config.data.mixture = ((data["jsonl"], 2.0), (data["arrayrecord"], 1.0))
  ref, _ = take(config, 6)
  first, state = take(config, 3)
  assert_same(first, ref[:3])
  rest, _ = take(config, 3, state)
  assert_same(rest, ref[3:])


@pytest.mark.parametrize("value,expected", [
    ((), []),
    ((("jsonl:/a/b.jsonl", 0.7), ("wds:/d/{0..3}.tar", 3)),
     [("jsonl:/a/b.jsonl", 0.7), ("wds:/d/{0..3}.tar", 3.0)]),
    (("csv:/a.csv?image_column=p=0.5",), [("csv:/a.csv?image_column=p", 0.5)]),
])
def test_parse_mixture(value, expected):
  assert mixture.parse_mixture(value) == expected


@pytest.mark.parametrize("value,match", [
    (("jsonl:/a.jsonl",), "no weight"),
    (("jsonl:/a.jsonl=x",), "not a number"),
    ((("jsonl:/a.jsonl", 0),), "must be > 0"),
    ((("jsonl:/a.jsonl", 1, 2),), "pair"),
])
def test_bad_mixture_is_a_clear_config_error(value, match):
  config = small_config()
  config.data.mixture = value
  with pytest.raises(ValueError, match=match):
    validation.validate(config)


@pytest.mark.slow
def test_main_trains_a_cli_mixture_with_two_workers(data, tmp_path):
  # main.py runs under absl.app: grain's worker processes must neither re-parse flags
  # nor re-run main. The mixture comes from the command line.
  from tests import test_multiprocess  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  mix = f"(('{data['jsonl']}', 0.6), ('{data['arrayrecord']}', 0.4))"
  argv = [sys.executable, "main.py", f"--workdir={workdir}"] + test_multiprocess.TINY + [
      "--config.total_steps=3", "--config.checkpoint_every=100",
      "--config.evals.zeroshot.every=-1", "--config.data.tokenizer=bytes",
      "--config.model.text.vocab_size=264", "--config.data.worker_count=2",
      f"--config.data.mixture={mix}", "--config.data.max_bad_fraction=0.5"]
  proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "config.json") as f:
    assert json.load(f)["data"]["mixture"] == [[data["jsonl"], 0.6],
                                               [data["arrayrecord"], 0.4]]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_too_many_bad_records_in_a_mixture_names_the_source(tmp_path, data):
  broken = "jsonl:" + datagen.write_jsonl(str(tmp_path / "b"), 10, "b", bad=set(range(6)))
  config = small_config(batch_size=10)
  config.data.max_bad_fraction = 0.05
  config.data.mixture = ((data["arrayrecord"], 0.5), (broken, 0.5))
  with pytest.raises(robust.TooManyBadRecords) as e:
    take(config, 30)
  message = str(e.value)
  assert "mixture(" in message and "unreadable" in message
  by_source = message.split("By source: ")[1]
  assert broken in by_source and data["arrayrecord"] not in by_source
  assert re.search(r"/b/[0-5]\.jpg", message)  # example keys of the broken records
