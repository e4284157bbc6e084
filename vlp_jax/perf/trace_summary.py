"""Where a train step's time goes, from a jax.profiler trace (`*.trace.json.gz`).

Reads the Chrome-trace JSON that `jax.profiler` writes next to its xplane file, keeps
the work on the accelerator's device timelines (`/device:GPU:0`, `/device:TPU:0`:
kernels, named by their HLO op where the trace says; summary lines such as "Steps",
"XLA Modules" or framework name scopes are skipped), or on CPU the XLA op executions
on host threads (events carrying an `hlo_op`), and sums their time per op and per kind
of work: matmul, attention, elementwise and reduction fusions, copies, collectives.
Steps are the `StepTraceAnnotation` events the trainer and tools/benchmark.py write
(name `train`). With the compiled HLO, op time is also split by the part of the step
it belongs to (`part`: image / text tower attention, MLP, rest; the token embedding;
loss and projections; the optimizer update), forward and backward, from each op's
`op_name` metadata.
"""
import collections
import dataclasses
import glob
import gzip
import json
import os
import re

# (category, pattern) in order; the first that matches the kernel name or the HLO op wins.
CATEGORIES = (
    ("attention", r"sdpa|fmha|flash|fused_attention|dot_product_attention|cudnn"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|"
                   r"collective-permute|allreduce|allgather"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|matmul|\bdot|convolution"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic-update-slice"),
    ("reduction", r"reduce"),
    ("elementwise", r"fusion|loop_|add|multiply|select|convert|broadcast"),
)


def category(kernel: str, hlo_op: str, contents=()) -> str:
  """The kind of work an op does, from its kernel name, HLO op name and (when the
  compiled HLO is at hand) the opcodes and custom-call targets it contains."""
  text = f"{kernel} {hlo_op} {' '.join(sorted(contents))}".lower()
  if contents:  # what the op computes decides, not what it happens to be called
    if re.search(CATEGORIES[0][1], text):
      return "attention"
    if {"dot", "convolution"} & set(contents) or re.search(r"gemm|matmul", text):
      return "matmul"
  for name, pattern in CATEGORIES:
    if re.search(pattern, text):
      return name
  return "other"


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=\{?([^},]+(?:,\s*%[^},]+)*)\}?")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def hlo_op_contents(hlo_text: str) -> dict:
  """Compiled HLO text -> {instruction name: set of opcodes (and custom-call targets)
  it runs, through the computations it calls}."""
  own, calls, comps = {}, {}, collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("(", 1)[0]:
      current = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, rest = m.group(1), m.group(2)
    op = _OPCODE.search(" " + rest)
    ops = {op.group(1)} if op else set()
    ops |= set(_TARGET.findall(rest))
    own[name] = ops
    calls[name] = [c.strip().lstrip("%") for g in _CALLS.findall(rest)
                   for c in g.split(",")]
    comps[current].append(name)

  memo = {}

  def comp_contents(comp, seen):
    if comp in memo:
      return memo[comp]
    out = set()
    for inst in comps.get(comp, ()):
      out |= own[inst]
      for c in calls[inst]:
        if c not in seen:
          out |= comp_contents(c, seen | {c})
    memo[comp] = out
    return out

  result = {}
  for name in own:
    out = set(own[name])
    for c in calls[name]:
      out |= comp_contents(c, {c})
    result[name] = out
  return result


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict:
  """Compiled HLO text -> {instruction name: its metadata op_name} (where it has one)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name = _OP_NAME.search(m.group(2))
      if name:
        out[m.group(1)] = name.group(1)
  return out


# Module paths of the towers (flax module names in op_name) and the model methods that
# call them (`TwoTower.embed_image`, `CoCa.encode_image`, `CoCa.multimodal`).
_TOWER_MODULES = {"img": "image", "txt": "text", "decoder": "decoder"}
_TOWER_METHODS = (("image", ("embed_image", "encode_image")),
                  ("text", ("embed_text", "encode_text")),
                  ("decoder", ("multimodal", "decode", "caption")))


def _tower(segments):
  """(tower, the path segments below it) from an op_name's segments, or
  ('projection', []) for a head (`img_proj`, `txt_proj`, `vocab_proj`, ...) reached
  before any tower module, or (None, [])."""
  tower, below = None, []
  for i, seg in enumerate(segments):
    if seg in _TOWER_MODULES:
      return _TOWER_MODULES[seg], segments[i + 1:]
    if seg.endswith("_proj"):
      return "projection", []
    if "." in seg and "(" not in seg:  # a model method: Model.method
      method = seg.rsplit(".", 1)[1]
      for name, prefixes in _TOWER_METHODS:
        if method.startswith(prefixes):
          tower, below = name, segments[i + 1:]
  return tower, below


def part(op_name: str) -> tuple:
  """(part of the train step, 'fwd' / 'bwd' / '') for an HLO op_name such as
  'jit(train_step)/transpose(jvp(TwoTower))/TwoTower.embed_image/img/encoder/block_2/
  attn/...' or 'jit(train_step)/jvp(CoCa)/txt/encoder/...': the tower (image `img`,
  text `txt`, CoCa's multimodal `decoder`, found by module path) and its attention,
  cross-attention, MLP or rest (norms, embeddings, pooling), the token embedding, the
  loss and projections (everything else under the gradient), or the optimizer update
  (clipping, AdamW, checks: what runs after the gradient)."""
  if not op_name:
    return "other", ""
  op_name = op_name.split(";", 1)[0]  # XLA joins the names of merged ops with ';'
  direction = ("bwd" if "transpose(" in op_name else
               "fwd" if "jvp(" in op_name else "")
  segments = op_name.split("/")
  if "token_embedding" in segments:
    return "token embedding", direction
  tower, below = _tower(segments)
  if tower == "projection":
    return "loss and projections", direction
  if tower:
    if any("pool" in s for s in below):  # attention pooling heads belong to the rest
      return f"{tower} rest (norms, embeddings, pooling)", direction
    if "cross_attn" in below:
      return f"{tower} cross-attention", direction
    if any(s == "attn" or s.startswith("attn.") for s in below):
      return f"{tower} attention", direction
    if "mlp" in below:
      return f"{tower} MLP", direction
    return f"{tower} rest (norms, embeddings, pooling)", direction
  if direction:
    return "loss and projections", direction
  if op_name.startswith(("jit(", "state.", "reduce", "select", "or", "and")):
    return "optimizer update (clip, AdamW, checks)", ""
  return "other", ""


# Device timeline lines that summarise other lines (their spans would count twice).
_SUMMARY_LINE = re.compile(r"step|module|framework|scope|source|launch", re.IGNORECASE)


def find_trace(path: str) -> str:
  """`path` itself if it is a trace file, else the newest `*.trace.json.gz` under it."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(
        f"No *.trace.json.gz under {path}. Write one with --config.profile_steps=[a,b] "
        f"(trainer) or tools/benchmark.py --profile_dir={path}.")
  return max(found, key=os.path.getmtime)


def load_events(path: str) -> list:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


@dataclasses.dataclass
class OpTime:
  hlo_op: str
  kernel: str
  category: str
  total_us: float = 0.0
  count: int = 0


def _union_us(intervals) -> float:
  """Length of the union of (start, end) intervals: time at least one op ran."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def summarize(events: list, hlo_text: str = "") -> dict:
  """Per-step time by category and by op (see module docstring). With the compiled
  HLO text (`compiled.as_text()`), ops are classified by what they contain."""
  contents = hlo_op_contents(hlo_text) if hlo_text else {}
  op_names = hlo_op_names(hlo_text) if hlo_text else {}
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "/device:" in name}
  summary_lines = {(e["pid"], e.get("tid")) for e in events
                   if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and _SUMMARY_LINE.search(e["args"]["name"])}
  ops = [e for e in events if e.get("ph") == "X" and e["pid"] in device_pids
         and (e["pid"], e.get("tid")) not in summary_lines]
  if not ops:  # CPU: XLA's thunks run on host threads, tagged with their hlo_op
    device_pids = set()
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  if not ops:
    raise ValueError("The trace has no XLA op events (args.hlo_op); was a step run "
                     "while tracing?")
  steps = [e for e in events if e.get("ph") == "X" and e.get("name") == "train"
           and "step_num" in e.get("args", {})]
  num_steps = max(1, len(steps))
  if steps:
    wall_us = sum(e["dur"] for e in steps) / num_steps
  else:
    wall_us = max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
  by_op = {}
  for e in ops:
    key = (e.get("args", {}).get("hlo_op", e["name"]), e["name"])
    if key not in by_op:
      by_op[key] = OpTime(key[0], key[1],
                          category(e["name"], key[0], contents.get(key[0], ())))
    by_op[key].total_us += e["dur"]
    by_op[key].count += 1
  total_us = sum(o.total_us for o in by_op.values())
  cats = collections.defaultdict(float)
  for o in by_op.values():
    cats[o.category] += o.total_us
  parts = collections.defaultdict(lambda: collections.defaultdict(float))
  if op_names:
    for o in by_op.values():
      name, direction = part(op_names.get(o.hlo_op, ""))
      parts[name][direction or "other"] += o.total_us
  busy_us = _union_us((e["ts"], e["ts"] + e["dur"]) for e in ops) / num_steps
  return {
      "steps": len(steps), "timeline": "device" if device_pids else "host",
      "step_wall_ms": wall_us / 1e3,
      "busy_ms_per_step": busy_us / 1e3,
      "idle_fraction": max(0.0, 1.0 - busy_us / wall_us) if wall_us else 0.0,
      "op_ms_per_step": total_us / num_steps / 1e3,
      "categories": {k: {"ms_per_step": v / num_steps / 1e3, "fraction": v / total_us}
                     for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
      "parts": {k: {"ms_per_step": sum(v.values()) / num_steps / 1e3,
                    "fraction": sum(v.values()) / total_us,
                    **{f"{d}_ms_per_step": t / num_steps / 1e3 for d, t in v.items()}}
                for k, v in sorted(parts.items(), key=lambda kv: -sum(kv[1].values()))},
      "ops": [dict(dataclasses.asdict(o), ms_per_step=o.total_us / num_steps / 1e3,
                   fraction=o.total_us / total_us)
              for o in sorted(by_op.values(), key=lambda o: -o.total_us)],
  }


def markdown(summary: dict, top: int = 25) -> str:
  """The summary as two markdown tables (categories, then the `top` ops)."""
  s = summary
  lines = [
      f"{s['steps']} step(s) on the {s['timeline']} timeline: {s['step_wall_ms']:.2f} ms "
      f"per step, ops busy {s['busy_ms_per_step']:.2f} ms (idle "
      f"{s['idle_fraction']:.1%}); op time summed over streams/threads "
      f"{s['op_ms_per_step']:.2f} ms.", "",
      "| kind | ms/step | share |", "|---|---|---|"]
  lines += [f"| {k} | {v['ms_per_step']:.3f} | {v['fraction']:.1%} |"
            for k, v in s["categories"].items()]
  if s.get("parts"):
    lines += ["", "| part of the step | ms/step | share | forward | backward |",
              "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['ms_per_step']:.3f} | {v['fraction']:.1%} | "
              f"{v.get('fwd_ms_per_step', 0.0):.3f} | {v.get('bwd_ms_per_step', 0.0):.3f} |"
              for k, v in s["parts"].items()]
  lines += ["", "| op | kernel | kind | ms/step | share | calls |", "|---|---|---|---|---|---|"]
  n = max(1, s["steps"])
  for o in s["ops"][:top]:
    kernel = o["kernel"] if len(o["kernel"]) <= 60 else o["kernel"][:57] + "..."
    lines.append(f"| {o['hlo_op']} | {kernel} | {o['category']} | "
                 f"{o['ms_per_step']:.3f} | {o['fraction']:.1%} | {o['count'] / n:g} |")
  return "\n".join(lines)
