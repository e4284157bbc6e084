"""End to end (slow): a tiny training sweep, then an evaluation sweep of its checkpoints
and of imported (init_from) parameters, with one member failing on purpose."""
import csv
import json
import os
import textwrap

import pytest

from experiments import sweep

# configs/demo.py shrunk (as tests/test_train.py's tiny_config): 8 steps, zero-shot only.
TINY = {"batch_size": 8, "total_steps": 8, "log_every": 4, "checkpoint_every": 4,
        "model.embed_dim": 16, "model.image.width": 32, "model.image.depth": 1,
        "model.image.mlp_dim": 64, "model.image.num_heads": 2, "model.image.patch_size": 8,
        "model.text.width": 32, "model.text.depth": 1, "model.text.mlp_dim": 64,
        "model.text.num_heads": 2, "model.decoder.depth": 1,
        "model.decoder.num_queries": 4, "data.image_size": 32, "optim.warmup_steps": 2,
        "plot": False, "evals.zeroshot.every": 4, "evals.zeroshot.size": 24,
        "evals.zeroshot.batch_size": 8, "evals.retrieval.every": -1,
        "evals.captioning.every": -1}


@pytest.mark.slow
def test_train_then_eval_sweep_with_a_failing_member(tmp_path, capsys):
  train_file = tmp_path / "train_sweep.py"
  train_file.write_text(f"BASE = 'configs/demo.py'\nCOMMON = {TINY!r}\nSWEEP = [{{}}]\n")
  train_dir = str(tmp_path / "train")
  assert sweep.main([str(train_file), f"--workdir={train_dir}"]) == 0
  run = os.path.join(train_dir, "0")
  metrics_before = open(os.path.join(run, "metrics.jsonl")).read()

  eval_file = tmp_path / "eval_sweep.py"
  eval_file.write_text(textwrap.dedent(f"""
      from experiments.sweep import train_sweep
      MODE = "eval"
      BASE = "configs/demo.py"
      TINY = {TINY!r}
      CHECKPOINTS = [
          *train_sweep({str(train_file)!r}, {train_dir!r}, steps="all"),
          {{"name": "imported", "init_from": {{"workdir": {run!r}, "step": 4}},
            "overrides": TINY}},
          {{"name": "missing", "workdir": {run!r}, "steps": [99], "overrides": TINY}},
      ]
  """))
  out = str(tmp_path / "evals")
  assert sweep.main([str(eval_file), f"--workdir={out}"]) == 1
  status = {m["name"]: m for m in json.load(open(os.path.join(out, "status.json")))[
      "members"]}
  assert {k: m["status"] for k, m in status.items()} == {
      "0.step4.recipe": "done", "0.step8.recipe": "done", "imported.init.recipe": "done",
      "missing.step99.recipe": "failed"}
  assert "No checkpoint at step 99" in status["missing.step99.recipe"]["error"]
  assert open(os.path.join(run, "metrics.jsonl")).read() == metrics_before

  with open(os.path.join(out, "results.csv")) as f:
    rows = {r["member"]: r for r in csv.DictReader(f)}
  assert [(k, r["step"], r["status"]) for k, r in rows.items()] == [
      ("0.step4.recipe", "4", "done"), ("0.step8.recipe", "8", "done"),
      ("imported.init.recipe", "0", "done"), ("missing.step99.recipe", "99", "failed")]
  # Step 8's figures are those the training run logged; imported step 4 = step 4.
  logged = [json.loads(l) for l in metrics_before.splitlines()]
  at_8 = [r for r in logged if r["step"] == 8 and "eval/zeroshot/top1" in r][0]
  assert float(rows["0.step8.recipe"]["eval/zeroshot/top1"]) == pytest.approx(
      at_8["eval/zeroshot/top1"])
  assert rows["imported.init.recipe"]["eval/zeroshot/top5"] == \
      rows["0.step4.recipe"]["eval/zeroshot/top5"]
  md = open(os.path.join(out, "results.md")).read()
  assert md.count("| done |") == 3 and "`missing.step99.recipe`" in md
  assert os.path.getsize(os.path.join(out, "results.png")) > 1000

  capsys.readouterr()
  assert sweep.main([str(eval_file), f"--workdir={out}"]) == 1  # Only the failed reruns.
  printed = capsys.readouterr().out
  assert printed.count("done before, skipped") == 3
  assert open(status["missing.step99.recipe"]["log"]).read().count("=== ") == 2
  assert open(status["0.step4.recipe"]["log"]).read().count("=== ") == 1
