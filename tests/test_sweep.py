"""experiments/sweep.py and tools/collect_sweep.py without JAX: members, failures,
reruns and the collected CSV / markdown / PNG, with a stand-in for main.py."""
import csv
import json
import os
import sys
import textwrap

import pytest

from experiments import sweep
from tools import collect_sweep

# Stands in for main.py: records each call; --config.fail=1 fails as main.py does on a
# user error; otherwise writes results.json (eval) or metrics.jsonl (train).
FAKE_MAIN = textwrap.dedent("""
    import json, os, sys
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    with open(os.environ["CALLS"], "a") as f:
      f.write(json.dumps(sys.argv[1:]) + "\\n")
    if flags.get("config.fail") == "1":
      print("some output\\nerror: deliberate failure (fix: do not fail)", file=sys.stderr)
      sys.exit(1)
    lr = float(flags.get("config.optim.lr", 1.0))
    if "--mode=eval" in sys.argv:
      step = int(flags.get("step", 0))
      os.makedirs(flags["eval_dir"], exist_ok=True)
      with open(os.path.join(flags["eval_dir"], "results.json"), "w") as f:
        json.dump({"step": step, "metrics": {"eval/zeroshot/top1": step / 100 * lr,
                                             "eval/zeroshot/num_examples": 8.0}}, f)
    else:  # Trains to total_steps (or stops at $STOP_AT, as on SIGTERM).
      total = int(flags.get("config.total_steps", 2))
      last = min(total, int(os.environ.get("STOP_AT", total)))
      os.makedirs(os.path.join(flags["workdir"], "checkpoints", str(last)), exist_ok=True)
      with open(os.path.join(flags["workdir"], "config.json"), "w") as f:
        json.dump({"total_steps": total}, f)
      with open(os.path.join(flags["workdir"], "metrics.jsonl"), "w") as f:
        for s in range(1, last + 1):
          f.write(json.dumps({"step": s, "loss": 1.0}) + "\\n")
          f.write(json.dumps({"step": s, "eval/zeroshot/top1": s * lr}) + "\\n")
""")


@pytest.fixture
def fake_main(tmp_path, monkeypatch):
  path = tmp_path / "fake_main.py"
  path.write_text(FAKE_MAIN)
  calls = tmp_path / "calls.jsonl"
  monkeypatch.setattr(sweep, "MAIN", str(path))
  monkeypatch.setenv("CALLS", str(calls))

  def read_calls():
    if not calls.exists():
      return []
    return [json.loads(l) for l in calls.read_text().splitlines()]
  return read_calls


def write_sweep(tmp_path, body):
  path = tmp_path / "my_sweep.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


def trained_workdir(tmp_path, steps=(4, 8)):
  d = tmp_path / "trained"
  for s in steps:
    (d / "checkpoints" / str(s)).mkdir(parents=True)
  return str(d)


def test_eval_members_are_checkpoints_times_eval_settings(tmp_path):
  trained = trained_workdir(tmp_path)
  spec = sweep.load(write_sweep(tmp_path, f"""
      MODE = "eval"
      BASE = "configs/demo.py"
      CHECKPOINTS = [{{"workdir": {trained!r}, "steps": "all", "overrides": {{"seed": 3}}}},
                     {{"name": "imp", "init_from": {{"workdir": {trained!r}, "step": 4}}}}]
      EVALS = [{{"name": "a"}}, {{"name": "b", "evals.zeroshot.size": 16}}]
      COMMON = {{"seed": 1, "batch_size": 8}}
  """))
  ms = sweep.members(spec, str(tmp_path / "out"))
  assert [m.name for m in ms] == ["trained.step4.a", "trained.step8.a", "trained.step4.b",
                                  "trained.step8.b", "imp.init.a", "imp.init.b"]
  by = {m.name: m for m in ms}
  f = by["trained.step8.b"].flags
  assert f"--workdir={trained}" in f and "--mode=eval" in f and "--step=8" in f
  assert f"--eval_dir={tmp_path / 'out' / 'trained.step8.b'}" in f
  # The checkpoint's overrides win over COMMON; the eval setting's are added.
  assert "--config.seed=3" in f and "--config.seed=1" not in f
  assert "--config.batch_size=8" in f and "--config.evals.zeroshot.size=16" in f
  assert f[0] == f"--config={os.path.join(sweep.ROOT, 'configs/demo.py')}"
  imp = by["imp.init.a"]
  assert imp.step == 0 and imp.series == "imp.a" and not any("--step" in a for a in imp.flags)
  assert f"--config.init_from.workdir={trained}" in imp.flags
  assert "--config.init_from.step=4" in imp.flags
  assert f"--workdir={imp.dir}" in imp.flags  # Its own directory: no checkpoints there.
  assert by["trained.step4.a"].series == "trained.a"


def test_steps_latest_and_the_errors_of_a_bad_sweep_file(tmp_path):
  trained = trained_workdir(tmp_path)
  spec = sweep.load(write_sweep(tmp_path, f"""
      MODE = "eval"
      BASE = "configs/demo.py"
      CHECKPOINTS = [{{"workdir": {trained!r}}}, {{"name": "none", "workdir": "/nowhere"}}]
  """))
  assert [m.name for m in sweep.members(spec, str(tmp_path))] == [
      "trained.step8.recipe", "none.latest.recipe"]
  spec.CHECKPOINTS = [{"workdir": trained, "init_from": {}}]
  with pytest.raises(ValueError, match="either 'workdir'.*or 'init_from'"):
    sweep.members(spec, str(tmp_path))
  spec.CHECKPOINTS = [{"workdir": trained, "step": 4}]
  with pytest.raises(ValueError, match=r"unknown keys \['step'\]"):
    sweep.members(spec, str(tmp_path))
  spec.CHECKPOINTS = [{"workdir": trained}, {"workdir": trained}]
  with pytest.raises(ValueError, match="share names"):
    sweep.members(spec, str(tmp_path))
  spec.MODE = "evaluate"
  with pytest.raises(ValueError, match="MODE"):
    sweep.members(spec, str(tmp_path))


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_failure_recorded_sweep_goes_on_rerun_skips_done_and_results_collected(
    tmp_path, fake_main, capsys):
  trained = trained_workdir(tmp_path)
  sweep_file = write_sweep(tmp_path, f"""
      MODE = "eval"
      BASE = "configs/demo.py"
      CHECKPOINTS = [{{"workdir": {trained!r}, "steps": "all"}},
                     {{"name": "broken", "workdir": {trained!r}, "steps": [8],
                       "overrides": {{"fail": 1}}}}]
      EVALS = [{{"name": "x"}}, {{"name": "half", "optim.lr": 0.5}}]
  """)
  out = str(tmp_path / "out")
  assert sweep.main([sweep_file, f"--workdir={out}"]) == 1
  assert len(fake_main()) == 6
  status = json.loads((tmp_path / "out" / "status.json").read_text())["members"]
  states = {m["name"]: m["status"] for m in status}
  assert states == {"trained.step4.x": "done", "trained.step8.x": "done",
                    "trained.step4.half": "done", "trained.step8.half": "done",
                    "broken.step8.x": "failed", "broken.step8.half": "failed"}
  failed = next(m for m in status if m["name"] == "broken.step8.x")
  assert failed["returncode"] == 1
  assert failed["error"] == "error: deliberate failure (fix: do not fail)"
  assert failed["log"] == os.path.join(out, "broken.step8.x", "log.txt")
  assert "deliberate failure" in open(failed["log"]).read()

  # The CSV: one row per member, its step and figures; counts (num_*) left out.
  rows = {r["member"]: r for r in read_csv(os.path.join(out, "results.csv"))}
  assert list(rows) == [m["name"] for m in status]
  assert float(rows["trained.step8.half"]["eval/zeroshot/top1"]) == pytest.approx(0.04)
  assert rows["trained.step4.x"]["step"] == "4"
  assert rows["broken.step8.x"]["status"] == "failed"
  assert rows["broken.step8.x"]["eval/zeroshot/top1"] == ""
  assert "eval/zeroshot/num_examples" not in rows["trained.step4.x"]
  md = open(os.path.join(out, "results.md")).read()
  assert "| member | step | status | zeroshot/top1 |" in md
  assert "| trained.step8.x | 8 | done | 0.0800 |" in md
  assert "`broken.step8.half`: error: deliberate failure" in md
  assert os.path.getsize(os.path.join(out, "results.png")) > 1000

  # Rerunning runs only the failed members; fixed, they complete.
  assert sweep.main([sweep_file, f"--workdir={out}"]) == 1
  calls = fake_main()
  assert len(calls) == 8 and all("--config.fail=1" in c for c in calls[6:])
  assert "trained.step4.x: done before, skipped" in capsys.readouterr().out
  assert sweep.main([sweep_file, f"--workdir={out}", "--", "--config.fail=0"]) == 0
  assert len(fake_main()) == 8 + 6  # Other flags: a new command, so every member runs.
  assert sweep.main([sweep_file, f"--workdir={out}", "--", "--config.fail=0"]) == 0
  assert len(fake_main()) == 14


def test_training_sweep_collects_its_eval_rows_and_feeds_an_eval_sweep(tmp_path, fake_main):
  train_file = write_sweep(tmp_path, """
      BASE = "configs/demo.py"
      SWEEP = [{"optim.lr": 0.5}, {"optim.lr": 1.0}]
      COMMON = {"total_steps": 2}
  """)
  out = str(tmp_path / "train")
  assert sweep.main([train_file, f"--workdir={out}"]) == 0
  rows = read_csv(os.path.join(out, "results.csv"))
  assert [(r["member"], r["step"], r["eval/zeroshot/top1"]) for r in rows] == [
      ("0-optim.lr=0.5", "2", "1.0"), ("1-optim.lr=1.0", "2", "2.0")]
  _, points, names = collect_sweep.collect(out)
  assert names == ["eval/zeroshot/top1"]
  assert [s for s, _ in points["0-optim.lr=0.5"]] == [1, 2]
  # train_sweep(): its members as the checkpoints of an evaluation sweep.
  ckpts = sweep.train_sweep(train_file, out)
  assert [(c["name"], c["overrides"]) for c in ckpts] == [
      ("0-optim.lr=0.5", {"total_steps": 2, "optim.lr": 0.5}),
      ("1-optim.lr=1.0", {"total_steps": 2, "optim.lr": 1.0})]
  assert ckpts[0]["workdir"] == os.path.join(out, "0-optim.lr=0.5")


def test_collect_sweep_cli(tmp_path, capsys):
  with pytest.raises(SystemExit, match="has no status.json"):
    collect_sweep.main([str(tmp_path)])
  (tmp_path / "status.json").write_text(json.dumps({"members": []}))
  collect_sweep.main([str(tmp_path)])
  assert "| member | step | status |" in capsys.readouterr().out
  assert (tmp_path / "results.png").exists() and (tmp_path / "results.csv").exists()


def test_sweep_runs_members_with_this_python(tmp_path, fake_main):
  sweep_file = write_sweep(tmp_path, """
      BASE = "configs/demo.py"
      SWEEP = [{}]
  """)
  assert sweep.main([sweep_file, f"--workdir={tmp_path / 'o'}"]) == 0
  log = open(tmp_path / "o" / "0" / "log.txt").read()
  assert log.startswith("=== ") and sys.executable in log


def test_mistakes_in_a_sweep_file_are_one_clear_message(tmp_path):
  with pytest.raises(SystemExit, match="sweep file not found"):
    sweep.main([str(tmp_path / "nope.py"), f"--workdir={tmp_path}"])
  bad = write_sweep(tmp_path, """
      MODE = "eval"
      BASE = "configs/demo.py"
  """)
  with pytest.raises(SystemExit, match="defines no CHECKPOINTS"):
    sweep.main([bad, f"--workdir={tmp_path}", "--dry_run"])
  steps = write_sweep(tmp_path, """
      MODE = "eval"
      BASE = "configs/demo.py"
      CHECKPOINTS = [{"workdir": "w", "steps": "last"}]
  """)
  with pytest.raises(SystemExit, match="steps='last'.*'all', 'latest' or a list"):
    sweep.main([steps, f"--workdir={tmp_path}"])


def test_a_training_run_stopped_early_is_not_done(tmp_path, fake_main, monkeypatch):
  """main.py exits 0 after a SIGTERM/Ctrl-C stop (with a checkpoint): the sweep marks
  the member unfinished and resumes it on the next run."""
  train_file = write_sweep(tmp_path, """
      BASE = "configs/demo.py"
      SWEEP = [{"optim.lr": 0.5}]
      COMMON = {"total_steps": 3}
  """)
  out = str(tmp_path / "train")
  monkeypatch.setenv("STOP_AT", "1")
  assert sweep.main([train_file, f"--workdir={out}"]) == 1
  rec = json.loads((tmp_path / "train" / "status.json").read_text())["members"][0]
  assert rec["status"] == "failed" and rec["returncode"] == 0
  assert rec["error"].startswith("stopped at step 1 of 3")
  monkeypatch.delenv("STOP_AT")
  assert sweep.main([train_file, f"--workdir={out}"]) == 0  # The same command resumes.
  assert sweep.main([train_file, f"--workdir={out}"]) == 0
  assert len(fake_main()) == 2  # The finished run is not started again.


def test_a_step_0_checkpoint_is_evaluated_at_step_0(tmp_path):
  # tools/convert_weights.py --to=vlp_jax writes checkpoints/0: without --step=0 main.py
  # would evaluate the newest checkpoint while the sweep records step 0.
  trained = trained_workdir(tmp_path, steps=(0, 8))
  spec = sweep.load(write_sweep(tmp_path, f"""
      MODE = "eval"
      BASE = "configs/demo.py"
      CHECKPOINTS = [{{"workdir": {trained!r}, "steps": "all"}}]
  """))
  by = {m.name: m for m in sweep.members(spec, str(tmp_path / "out"))}
  assert sorted(by) == ["trained.step0.recipe", "trained.step8.recipe"]
  zero = by["trained.step0.recipe"]
  assert zero.step == 0 and "--step=0" in zero.flags
  assert "--step=8" in by["trained.step8.recipe"].flags
  spec.CHECKPOINTS = [{"workdir": trained, "steps": [0]}]
  [m] = sweep.members(spec, str(tmp_path / "out"))
  assert [a for a in m.flags if a.startswith("--step")] == ["--step=0"]
