"""Times open_clip's CLIP train step (PyTorch eager) and prints one JSON object.

The reference side of `tools/compare_open_clip.py`. It runs in a separate environment
with torch and open_clip_torch installed (neither is a vlp_jax dependency) and uses
only argparse, so it never imports jax:

    python -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch torchvision open_clip_torch
    /tmp/ocvenv/bin/python tools/benchmark_open_clip.py --model=ViT-B-16 --batch_size=8
    /tmp/ocvenv/bin/python tools/benchmark_open_clip.py \\
        --model_json=tools/open_clip_small_cpu.json --batch_size=64

`--model_json` (a file, or the JSON text itself) is an open_clip model config
(`embed_dim`, `vision_cfg`, `text_cfg`, as open_clip's `model_configs/*.json`),
registered with `open_clip.add_model_config` under its file's stem (or `custom`), for
architectures open_clip does not ship, e.g. the small model of README "Performance".

The step is open_clip's `training/train.py` step without data: forward, ClipLoss,
backward, gradient clipping to norm 1, AdamW (betas 0.9/0.98, eps 1e-6, weight decay
0.2 on matrices only) and the logit-scale clamp. Random weights (pretrained=None), so
nothing is downloaded. Synthetic batches, as in tools/benchmark.py.
"""
import argparse
import json
import math
import statistics
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--model", default="ViT-B-16", help="open_clip model name.")
  p.add_argument("--model_json", default="",
                 help="An open_clip model config (a .json file or JSON text); "
                 "replaces --model.")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="Timed steps.")
  p.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="bfloat16: torch.autocast, as open_clip's --precision amp_bf16.")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: default).")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def register_model_json(spec: str) -> str:
  """Registers the open_clip model config `spec` (a path, or JSON text starting with
  '{') with open_clip; returns the model name to create it by."""
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import open_clip  # pylint: disable=g-import-not-at-top
  if spec.lstrip().startswith("{"):
    cfg = json.loads(spec)
    path = os.path.join(tempfile.mkdtemp(), "custom.json")
    with open(path, "w") as f:
      json.dump(cfg, f)
  else:
    if not os.path.isfile(spec):
      raise SystemExit(f"--model_json: no file {spec!r}; give an open_clip model "
                       "config file or its JSON text.")
    path = spec
    with open(path) as f:
      cfg = json.load(f)
  missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
  if missing:
    raise SystemExit(f"--model_json: the config lacks {missing}; an open_clip model "
                     "config has embed_dim, vision_cfg and text_cfg.")
  open_clip.add_model_config(path)
  return os.path.splitext(os.path.basename(path))[0]


def make_step(model, loss_fn, optimizer, dtype, device):
  """One open_clip training step on (images, texts); returns the loss."""
  import torch  # pylint: disable=g-import-not-at-top

  def step(images, texts):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = model(images, texts)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return loss
  return step


def main(argv=None):
  args = parse_args(argv)
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  device = torch.device("cpu")
  if args.model_json:
    args.model = register_model_json(args.model_json)
  model = open_clip.create_model(args.model, pretrained=None, device=device)
  model.train()
  model.output_dict = True
  # open_clip's main.py: no weight decay on gains, biases, embeddings and logit_scale.
  exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or \
      "logit_scale" in n
  named = list(model.named_parameters())
  optimizer = torch.optim.AdamW(
      [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
       {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
      lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  loss_fn = open_clip.ClipLoss()
  step = make_step(model, loss_fn, optimizer, args.dtype, device)

  size = model.visual.image_size
  size = size[0] if isinstance(size, (tuple, list)) else size
  g = torch.Generator().manual_seed(args.seed)
  images = torch.randn(args.batch_size, 3, size, size, generator=g)
  texts = torch.randint(1, model.vocab_size, (args.batch_size, model.context_length),
                        generator=g)
  for _ in range(args.warmup):
    step(images, texts)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step(images, texts)
    times.append(time.perf_counter() - t0)
  times.sort()
  median = statistics.median(times)
  print(json.dumps({
      "framework": "open_clip (PyTorch eager)",
      "model": args.model,
      "batch_size": args.batch_size,
      "dtype": args.dtype,
      "step_time_s": {"median": median, "min": times[0], "max": times[-1],
                      "steps": len(times)},
      "samples_per_s": args.batch_size / median,
      "num_params": sum(p.numel() for p in model.parameters()),
      "threads": torch.get_num_threads(),
      "torch_version": torch.__version__,
      "open_clip_version": open_clip.__version__,
      "final_loss": float(loss.detach()),
  }, sort_keys=True))


if __name__ == "__main__":
  main()
