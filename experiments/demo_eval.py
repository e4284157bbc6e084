"""Evaluation sweep: every checkpoint of the demo run x two prompt-template settings.

    make demo      # trains runs/demo (checkpoints every 200 steps)
    .venv/bin/python experiments/sweep.py experiments/demo_eval.py --workdir=runs/demo_eval

-> runs/demo_eval/results.{csv,md,png}: zero-shot top-1/top-5 per step with the
recipe's six `shapes` templates and with one template (see experiments/sweep.py).
"""
MODE = "eval"
BASE = "configs/demo.py"
CHECKPOINTS = [{"name": "demo", "workdir": "runs/demo", "steps": "all"}]
EVALS = [
    {"name": "shapes_templates"},
    {"name": "one_template", "evals.zeroshot.templates": "('a photo of a {}.',)"},
]
COMMON = {"evals.retrieval.every": -1, "evals.captioning.every": -1}  # Zero-shot only.
