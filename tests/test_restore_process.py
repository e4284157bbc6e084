"""Save the data-iterator state after k batches (Orbax + grain.checkpoint), restore it in
a NEW Python process: the next batches are exactly those of an uninterrupted run.
One child process runs all cases (arrayrecord, jsonl, wds, a mixture, jsonl read by 2
grain worker processes)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import datagen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, NEXT = 3, 3


def case_config(case):
  from tests.test_data_scale import small_config  # pylint: disable=g-import-not-at-top
  config = small_config(case.get("source", "shapes"), batch_size=3, seed=case["seed"])
  config.data.mixture = tuple(tuple(m) for m in case.get("mixture", ()))
  config.data.shuffle_buffer = case.get("shuffle_buffer", 0)
  config.data.worker_count = case.get("worker_count", 0)
  return config


def iterator(case):
  from tests.test_data_scale import TOKENIZER  # pylint: disable=g-import-not-at-top
  from vlp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return iter(pipeline.train_dataset(case_config(case), TOKENIZER))


def checkpointer():
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.Checkpointer(grain.checkpoint.CheckpointHandler()), grain.checkpoint


def child(case_file):
  """Restores every case's iterator and compares the next batches with the saved ones."""
  with open(case_file) as f:
    cases = json.load(f)
  ckpt, gc = checkpointer()
  for name, case in cases.items():
    it = iterator(case)
    ckpt.restore(case["ckpt"], args=gc.CheckpointRestore(it))
    ref = np.load(case["ref"])
    for i in range(NEXT):
      batch = next(it)
      for key in ("image", "text", "_bad_counts", "_seen"):
        np.testing.assert_array_equal(np.asarray(batch[key]), ref[f"{i}/{key}"],
                                      err_msg=f"{name} batch {i} {key}")
    it.close()
    print(f"restored {name}: {NEXT} batches equal", flush=True)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  root = tmp_path_factory.mktemp("restore")
  jsonl = "jsonl:" + datagen.write_jsonl(str(root / "j"), 16, "j", bad={5})
  arrayrecord = "arrayrecord:" + datagen.write_arrayrecord(str(root / "a"), 14)
  wds = "wds:" + datagen.write_wds(str(root / "w"), 3, 5, corrupt={(1, 2)})
  return root, {
      "arrayrecord": {"source": arrayrecord, "seed": 1},
      "jsonl": {"source": jsonl, "seed": 2},
      "wds": {"source": wds, "seed": 3, "shuffle_buffer": 4},
      "mixture": {"mixture": [[jsonl, 0.6], [arrayrecord, 0.4]], "seed": 4},
  }


def save_and_restore_in_child(root, cases):
  """Saves each case after K batches; the child restores and checks the next NEXT."""
  ckpt, gc = checkpointer()
  for name, case in cases.items():
    uninterrupted = iterator(case)
    ref = [next(uninterrupted) for _ in range(K + NEXT)]
    it = iterator(case)
    for i in range(K):
      np.testing.assert_array_equal(next(it)["image"], ref[i]["image"])
    case["ckpt"] = str(root / f"ckpt_{name}")
    ckpt.save(case["ckpt"], args=gc.CheckpointSave(it))
    case["ref"] = str(root / f"ref_{name}.npz")
    np.savez(case["ref"], **{f"{i}/{k}": np.asarray(b[k]) for i, b in
                             enumerate(ref[K:]) for k in b})
    # The batches after the restore point differ from those before it.
    assert not np.array_equal(ref[K]["image"], ref[0]["image"])
    it.close()
    uninterrupted.close()
  with open(root / "cases.json", "w") as f:
    json.dump(cases, f)
  code = (f"import sys; sys.argv = ['x']; from absl import flags; "
          f"flags.FLAGS.mark_as_parsed(); from tests import test_restore_process as t; "
          f"t.child({str(root / 'cases.json')!r})")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in cases:
    assert f"restored {name}: {NEXT} batches equal" in proc.stdout


def test_restore_in_a_new_process(cases):
  save_and_restore_in_child(*cases)


def test_restore_with_two_workers_in_a_new_process(cases):
  root, all_cases = cases
  case = dict(all_cases["jsonl"], worker_count=2)
  save_and_restore_in_child(root, {"jsonl_2_workers": case})
