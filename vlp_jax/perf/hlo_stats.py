"""What an XLA program asks for, counted from its HLO text: ops by kind, their bytes,
and the part of the code each comes from.

Works on the pre-optimisation HLO of a lowered function (`lowered_hlo_text`: what the
model and optimizer code ask for, the same on every platform) and on the optimised HLO
of a compiled one (`compiled.as_text()`: the backend's fusion decisions, which differ
between CPU and GPU). Each instruction is parsed with its output shape, operands,
fusion kind and metadata (`op_name`, the jax name stack with Flax module paths, and
`stack_frame_id`, resolved to the source files of its Python stack). From those it gets
a role: optimizer (optax, gradient norm and clipping), the non-finite guard, loss,
LayerNorm, softmax, GELU, attention, embedding, other model ops.

`kernels`: the instructions that run as kernels: every top-level instruction outside
fused and reducer computations, minus the free ones (parameter, constant, tuple,
get-tuple-element, bitcast, ...), control flow (call, while, conditional: their bodies
count), sharding annotations and the `*-done` halves of asynchronous ops. Kinds come
from trace_summary.category on each kernel's contents (a fusion holding a dot is a
matmul), as the profile summary classifies the same ops on a trace.
"""
import collections
import dataclasses
import linecache
import re

from vlp_jax.perf import trace_summary

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
    "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e3m4": 1, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
    "token": 0, "opaque": 0,
}
# Instructions that launch no kernel (views, bookkeeping).
FREE_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
            "after-all", "partition-id", "replica-id", "opt-barrier", "domain",
            "add-dependency", "iota"}
# Control flow (their bodies are counted) and annotations that run nothing.
CONTROL_OPS = {"call", "while", "conditional", "async-start", "async-done"}
ANNOTATION_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                      "xla.sdy.FuncResultSharding", "xla.sdy.GlobalToLocalShape",
                      "xla.sdy.LocalToGlobalShape",
                      "annotate_device_placement"}
COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all"}
ELEMENTWISE_OPS = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
    "exponential", "exponential-minus-one", "log", "log-plus-one", "sqrt", "rsqrt",
    "cbrt", "tanh", "logistic", "erf", "power", "select", "compare", "and", "or", "not",
    "xor", "sign", "floor", "ceil", "round-nearest-even", "round-nearest-afz", "clamp",
    "is-finite", "cosine", "sine", "tan", "atan2", "remainder", "shift-left",
    "shift-right-logical", "shift-right-arithmetic", "popcnt", "real", "imag",
    "stochastic-convert", "reduce-precision", "convert", "bitcast-convert"}

_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_KIND = re.compile(r"kind=(k\w+)")
_CALLED = re.compile(r"(calls|to_apply|body|condition|branch_computations)=\{?"
                     r"(%?[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?")
_TRIPS = re.compile(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)')
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")


@dataclasses.dataclass
class Instr:
  """One HLO instruction: name, opcode, output shapes [(dtype, dims)], operand names,
  the computation it is in, metadata and what it calls."""
  name: str
  opcode: str
  shapes: list
  operands: list
  computation: str
  op_name: str = ""
  frame: int = 0
  fusion_kind: str = ""
  calls: dict = dataclasses.field(default_factory=dict)
  files: tuple = ()  # (path, first line, last line) of each stack frame, innermost first
  role: str = ""
  target: str = ""  # custom-call target
  trip_count: int = 1  # a while loop's known trip count

  @property
  def out_bytes(self) -> float:
    return sum(shape_bytes(d, dims) for d, dims in self.shapes)

  @property
  def dtype(self) -> str:
    return self.shapes[0][0] if len(self.shapes) == 1 else "tuple"


def shape_bytes(dtype: str, dims) -> float:
  n = 1
  for d in dims:
    n *= d
  return n * DTYPE_BYTES.get(dtype, 4)


def _split_shape(rest: str):
  """'SHAPE opcode(...), attrs' -> (SHAPE, the rest after it)."""
  rest = rest.lstrip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:]
  head, _, tail = rest.partition(" ")
  return head, " " + tail


def _operands(text: str):
  """'(a, b), attrs' starting at the opcode's parenthesis -> (operand names, attrs)."""
  depth = 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(ch, 0)
    if depth == 0:
      inner, attrs = text[1:i], text[i + 1:]
      names = [tok.strip().split(" ")[-1].lstrip("%") for tok in _top_split(inner)]
      return [n for n in names if n], attrs
  return [], ""


def _top_split(text: str):
  out, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(text[start:i])
      start = i + 1
  out.append(text[start:])
  return out


@dataclasses.dataclass
class Module:
  """A parsed HLO module: computations (name -> instructions), the entry's name,
  and the source files of each stack frame id."""
  computations: dict
  entry: str
  frame_files: dict

  @property
  def instructions(self):
    return {i.name: i for comp in self.computations.values() for i in comp}


def parse(text: str) -> Module:
  """HLO text (as `compiled.as_text()` or `lowered_hlo_text` print it) -> Module."""
  comps, entry, current = collections.OrderedDict(), "", None
  tables, table = {"FileNames": {}, "FileLocations": {}, "StackFrames": {}}, None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped in tables:
      table = tables[stripped]
      continue
    if table is not None:
      row = _TABLE_ROW.match(stripped)
      if row:
        table[int(row.group(1))] = row.group(2)
        continue
      table = None
    header = _HEADER.match(line)
    if header and "=" not in line.split("{", 1)[0].split("(", 1)[0]:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    shape, rest = _split_shape(m.group(3))
    op = _OPCODE.match(rest)
    if not op:
      continue
    operands, attrs = _operands(rest[op.end() - 1:])
    calls = {k: [n.strip().lstrip("%") for n in v.split(",")]
             for k, v in _CALLED.findall(attrs)}
    name_m, frame_m, kind_m = (_OP_NAME.search(attrs), _FRAME.search(attrs),
                               _KIND.search(attrs))
    comps[current].append(Instr(
        name=m.group(2), opcode=op.group(1),
        shapes=[(d, tuple(int(x) for x in dims.split(",") if x))
                for d, dims in _SHAPE.findall(shape)],
        operands=operands, computation=current,
        op_name=name_m.group(1) if name_m else "",
        frame=int(frame_m.group(1)) if frame_m else 0,
        fusion_kind=kind_m.group(1) if kind_m else "", calls=calls,
        target=(re.findall(r'custom_call_target="([^"]+)"', attrs) or [""])[0],
        trip_count=int((_TRIPS.findall(attrs) or [1])[0])))
  frame_files = _frame_files(tables)
  for comp in comps.values():
    for inst in comp:
      inst.files = frame_files.get(inst.frame, ())
      inst.role = role(inst)
  return Module(comps, entry or next(reversed(comps), ""), frame_files)


def _frame_files(tables) -> dict:
  """stack frame id -> the source locations (file, first line, last line) of the frame
  and its parents, innermost first."""
  files = {k: v.strip().strip('"') for k, v in tables["FileNames"].items()}
  locs = {}
  for k, v in tables["FileLocations"].items():
    f, a, b = (re.search(rf"{key}=(\d+)", v) for key in ("file_name_id", "line",
                                                          "end_line"))
    first = int(a.group(1)) if a else 0
    locs[k] = (files.get(int(f.group(1)), "") if f else "", first,
               int(b.group(1)) if b else first)
  frames = {}
  for k, v in tables["StackFrames"].items():
    loc = re.search(r"file_location_id=(\d+)", v)
    parent = re.search(r"parent_frame_id=(\d+)", v)
    frames[k] = (locs.get(int(loc.group(1)), ("", 0, 0)) if loc else ("", 0, 0),
                 int(parent.group(1)) if parent else 0)
  out = {}
  for k in frames:
    chain, seen, f = [], set(), k
    while f in frames and f not in seen:
      seen.add(f)
      chain.append(frames[f][0])
      f = frames[f][1] - 1  # XLA prints the parent's id + 1 (0: no parent)
    out[k] = tuple(chain)
  return out


def source_text(inst: "Instr") -> str:
  """The source lines of the innermost stack frame of `inst` ('' if unknown)."""
  if not inst.files:
    return ""
  path, first, last = inst.files[0]
  return "".join(linecache.getline(path, n) for n in range(first, min(last, first + 5)
                                                           + 1))


# (role, test on (op_name, source files, innermost source line), all lowercase) in
# order; the first that matches wins. jax's own frames are not in the stacks, so
# GELU and softmax are found by the line of model code that calls them.
ROLES = (
    ("nonfinite_guard", lambda n, f, t: "train/nonfinite.py" in f),
    ("optimizer", lambda n, f, t: "/optax/" in f or "train/optim.py" in f),
    ("loss", lambda n, f, t: "/objectives/" in f),
    ("layernorm", lambda n, f, t: "normalization.py" in f or "/ln_" in n
     or "layernorm" in n or "layer_norm" in t),
    ("softmax", lambda n, f, t: "softmax" in n or "softmax" in t),
    ("gelu", lambda n, f, t: "gelu" in n or "gelu" in t or "sigmoid(1.702" in t),
    ("attention", lambda n, f, t: "attn" in n or "attention" in n),
    ("embedding", lambda n, f, t: "embed" in n and ("gather" in n or "take" in n
                                                     or "scatter" in n)),
    ("model", lambda n, f, t: "/models/" in f),
)


def role(inst: Instr) -> str:
  """The part of the code an instruction comes from (see ROLES), or 'other'."""
  if not inst.op_name and not inst.files:
    return "no_metadata"  # compiler-inserted (e.g. CPU's bf16 emulation) or bookkeeping
  name = inst.op_name.lower()
  files = " ".join(loc[0] for loc in inst.files).lower()
  text = source_text(inst).lower()
  for r, test in ROLES:
    if test(name, files, text):
      return r
  return "other"


def kernels(module: Module) -> list:
  """The instructions that run as kernels (see module docstring) as (instruction,
  role) pairs, each pair as many times as its computation runs per step: through
  call, conditional (each branch once) and while (its known trip count, else once).
  Ops in a called computation without a role of their own (jax's nested jits such as
  `jnp.where`) take their call site's."""
  out = []

  def visit(comp, times, inherited, depth):
    for inst in module.computations.get(comp, ()):
      own = inst.role if inst.role not in _VAGUE else inherited or inst.role
      if inst.opcode in ("call", "while", "conditional", "async-start") and depth < 50:
        trips = inst.trip_count if inst.opcode == "while" else 1
        for attr, names in inst.calls.items():
          for name in names:
            if name in module.computations:
              visit(name, times * (trips if attr == "body" else 1), own, depth + 1)
      elif inst.opcode not in FREE_OPS | CONTROL_OPS and (
          inst.target not in ANNOTATION_TARGETS) and not inst.opcode.endswith("-done"):
        out.extend([(inst, own)] * times)

  visit(module.entry, 1, "", 0)
  return out


_VAGUE = ("other", "no_metadata")


def collectives(text: str) -> dict:
  """{collective: {'count', 'bytes'}} of an HLO module's text, each as many times as
  it runs per step (`kernels`), async pairs once (at their start), fused ones by the
  collective they hold; bytes are each op's (largest) output."""
  module = parse(text)
  contents = trace_summary.hlo_op_contents(text)
  out = {}
  for inst, _ in kernels(module):
    ops = [re.sub(r"-start$", "", o) for o in [inst.opcode, *contents.get(inst.name, ())]]
    name = next((o for o in ops if o in COLLECTIVES), None)
    if name is None:
      continue
    row = out.setdefault(name, {"count": 0, "bytes": 0.0})
    row["count"] += 1
    row["bytes"] += max((shape_bytes(d, dims) for d, dims in inst.shapes), default=0.0)
  return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def _fusion_roles(module: Module, inst: Instr) -> str:
  """A fusion's role: the commonest role among the instructions it fuses."""
  roles = collections.Counter()
  for comp in inst.calls.get("calls", ()):
    for i in module.computations.get(comp, ()):
      if i.opcode not in FREE_OPS and i.role != "other":
        roles[i.role] += 1
  return roles.most_common(1)[0][0] if roles else inst.role


def kernel_kind(inst: Instr, contents) -> str:
  """matmul / attention / collective / copy / transpose / convert / reduction /
  elementwise / reshape / broadcast / other, by what the kernel computes."""
  ops = set(contents) | {inst.opcode}
  if any(re.sub(r"-(start|done)$", "", o) in COLLECTIVES for o in ops):
    return "collective"
  cat = trace_summary.category("", "", ops)  # by contents, not by (jax's) names
  if cat in ("matmul", "attention"):
    return cat
  real = ops - FREE_OPS - {"fusion"}
  if inst.opcode in ("reshape", "broadcast"):  # unfused HLO: mostly free views
    return inst.opcode
  if inst.opcode == "transpose" or real == {"transpose"}:
    return "transpose"
  if inst.opcode == "copy" or real <= {"copy", "reshape"}:
    return "copy"
  if real and real <= {"convert", "reshape", "broadcast", "transpose", "copy"}:
    return "convert"
  if {"reduce", "reduce-window"} & real:
    return "reduction"
  if real and real <= ELEMENTWISE_OPS | {"broadcast", "reshape", "slice",
                                         "concatenate", "pad", "dynamic-slice",
                                         "dynamic-update-slice", "reverse", "transpose",
                                         "copy"}:
    return "elementwise"
  return cat if cat in ("copy", "reduction", "elementwise") else "other"


def _source_param(instrs, name, entry_params, depth=8):
  """The entry parameter `name` reads, through reshapes, bitcasts and copies, or None."""
  for _ in range(depth):
    if name in entry_params:
      return instrs[name]
    inst = instrs.get(name)
    if inst is None or inst.opcode not in ("reshape", "bitcast", "copy", "transpose",
                                           "get-tuple-element", "broadcast"):
      return None
    name = inst.operands[0] if inst.operands else ""
  return None


# An entry parameter holding model parameters: jax names it after the argument path
# (`state.params['img']...`, or `params[...]` for a function of `params`).
_PARAM_ARG = re.compile(r"(^|\.)params\b")


def _is_pair_logits(shapes, batch: int, rows=()) -> bool:
  """[.., R, B] with B = `batch` and R = B or one of `rows` (a shard's rows)."""
  rows = {batch, *rows}
  return batch > 1 and any(len(dims) >= 2 and dims[-1] == batch and dims[-2] in rows
                           for _, dims in shapes)


def summarize(text: str, batch: int = 0, top: int = 12, local_batch: int = 0) -> dict:
  """Counts and bytes of the kernels of the HLO `text` (see module docstring):
  output bytes ('bytes') and output + operand bytes ('io_bytes', the traffic of a
  memory-bound kernel) per kind, per role and per non-matmul fusion kind; converts by
  direction, and the float32 -> bf16 casts of entry parameters ('param_casts':
  master weights cast every step); the optimizer's kernels; [B, B] tensors
  ('pair_logits': [R, B] with B = `batch`, the global batch, and R = B or
  `local_batch`, one device's rows: a sharded loss's logits, in a shard_map body of
  the pre-optimisation HLO or in the compiled per-device HLO); the `top` source lines
  by the bytes of their non-matmul kernels. The pre-optimisation HLO's shapes are
  global outside shard_map bodies, per device inside."""
  module = parse(text)
  instrs = module.instructions
  contents = trace_summary.hlo_op_contents(text)
  entry_params = {i.name for i in module.computations.get(module.entry, ())
                  if i.opcode == "parameter"}
  by_kind, by_role, fusions = {}, {}, {}
  convert_dirs, param_casts = collections.Counter(), {"count": 0, "bytes": 0.0}
  opt_kernels, logits, sources, role_nm = [], {"count": 0, "bytes": 0.0}, {}, {}
  ks = kernels(module)

  def add(table, key, inst, io):
    row = table.setdefault(key, {"count": 0, "bytes": 0.0, "io_bytes": 0.0})
    row["count"] += 1
    row["bytes"] += inst.out_bytes
    row["io_bytes"] += io

  for inst, inst_role in ks:
    io = inst.out_bytes + sum(instrs[o].out_bytes for o in inst.operands if o in instrs)
    kind = kernel_kind(inst, contents.get(inst.name, ()))
    r = _fusion_roles(module, inst) if inst.opcode == "fusion" else inst_role
    add(by_kind, kind, inst, io)
    add(by_role, r, inst, io)
    if inst.opcode == "fusion" and kind not in ("matmul", "attention"):
      add(fusions, inst.fusion_kind or "unknown", inst, io)
    if r == "optimizer":
      opt_kernels.append(inst)
    if kind not in ("matmul", "attention", "reshape", "broadcast"):
      role_nm[r] = role_nm.get(r, 0.0) + inst.out_bytes
    if kind not in ("matmul", "attention", "reshape", "broadcast") and inst.files:
      path, line, _ = inst.files[0]
      add(sources, (f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{line}", r),
          inst, io)
    if _is_pair_logits(inst.shapes, batch, (local_batch,) if local_batch else ()):
      logits["count"] += 1
      logits["bytes"] += inst.out_bytes
  for inst in instrs.values():  # converts, fused or not: what the code asks for
    if inst.opcode != "convert" or not inst.operands or inst.operands[0] not in instrs:
      continue
    src = instrs[inst.operands[0]].dtype
    convert_dirs[f"{src}->{inst.dtype}"] += 1
    param = _source_param(instrs, inst.operands[0], entry_params)
    if (src == "f32" and inst.dtype in ("bf16", "f16") and param is not None
        and _PARAM_ARG.search(param.op_name)):
      param_casts["count"] += 1
      param_casts["bytes"] += inst.out_bytes
  matmul = by_kind.get("matmul", {}).get("bytes", 0.0)
  total = sum(v["bytes"] for v in by_kind.values())
  io_total = sum(v["io_bytes"] for v in by_kind.values())
  non_mm_io = io_total - sum(by_kind.get(k, {}).get("io_bytes", 0.0)
                             for k in ("matmul", "attention"))
  return {
      "kernels": len(ks), "bytes": total, "io_bytes": io_total,
      "non_matmul_io_bytes": non_mm_io, "matmul_bytes": matmul,
      "by_kind": _sorted(by_kind), "by_role": _sorted(by_role),
      "non_matmul_fusions": _sorted(fusions),
      "converts": dict(convert_dirs.most_common()),
      "param_casts": param_casts,
      "optimizer": {"kernels": len(opt_kernels),
                    "bytes": sum(i.out_bytes for i in opt_kernels),
                    "by_opcode": dict(collections.Counter(
                        i.fusion_kind or i.opcode for i in opt_kernels).most_common())},
      "pair_logits": logits,
      "role_non_matmul": role_nm,
      "top_sources": [dict(source=k[0], role=k[1], **v) for k, v in sorted(
          sources.items(), key=lambda kv: -kv[1]["bytes"])[:top]],
  }


def _sorted(table):
  return dict(sorted(table.items(), key=lambda kv: -kv[1]["io_bytes"]))


def lowered_hlo_text(lowered) -> str:
  """The pre-optimisation HLO of a `jax.jit(...).lower(...)` result, with metadata
  (op_name, source stack frames)."""
  from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
  options = _hlo.HloPrintOptions()
  options.print_metadata = True
  return lowered.compiler_ir("hlo").get_hlo_module().to_string(options)


def lower_train_step(config, devices=None):
  """The trainer's jitted train step for `config`, lowered on abstract state and a
  synthetic batch's shapes (nothing is allocated or run); (lowered, TrainSetup)."""
  from vlp_jax.perf import benchmark  # pylint: disable=g-import-not-at-top
  from vlp_jax.train.setup import TrainSetup  # pylint: disable=g-import-not-at-top
  setup = TrainSetup(config, devices)
  batch = benchmark.abstract_batch(config, setup.batch_sharding)
  with setup.contexts()[0], setup.contexts()[1]:
    return setup.step_fn.lower(setup.abstract, batch), setup


def per_sample(small: dict, large: dict, b_small: int, b_large: int) -> dict:
  """{table: {key: bytes per sample}} from two summaries at batches b_small < b_large
  (the slope: work that does not grow with the batch, such as the optimizer's, is 0)."""
  out = {}
  get = lambda t, k: t.get(k, {}).get("bytes", 0.0) if isinstance(t.get(k), dict) \
      else t.get(k, 0.0)
  for table in ("by_kind", "by_role", "role_non_matmul"):
    keys = set(small[table]) | set(large[table])
    out[table] = {k: (get(large[table], k) - get(small[table], k)) / (b_large - b_small)
                  for k in keys}
  return out


def extrapolate(summary: dict, slope: dict, batch: int, at_batch: int) -> dict:
  """Role -> non-matmul output bytes at `at_batch` (fixed part + at_batch x the
  per-sample slope from `per_sample`), from a summary at `batch`. `batch`, `at_batch`
  and the slope's samples must be counted alike: global batches for the
  pre-optimisation HLO (its shapes are global)."""
  out = {}
  for k, b in summary["role_non_matmul"].items():
    per = slope["role_non_matmul"].get(k, 0.0)
    out[k] = max(0.0, b - batch * per) + at_batch * per
  return out


def _mb(x):
  return f"{x / 1e6:,.1f}"


def markdown(report: dict) -> str:
  """hlo_report's record as markdown: pre-optimisation tables, then the optimised ones."""
  lines = [f"### {report['config']} {' '.join(report['overrides'])}".rstrip(), "",
           f"batch {report['batch_size']} ({report['per_device_batch']} per device, "
           f"{report['num_devices']} device(s), {report['platform']}), dtype "
           f"{report['dtype']}, {report['param_leaves']} parameter arrays "
           f"({report['num_params']:,} parameters)", ""]
  pre, slope = report["pre"], report.get("pre_per_sample")
  non_mm = sum(v["bytes"] for k, v in pre["by_kind"].items()
               if k not in ("matmul", "attention", "reshape", "broadcast"))
  lines += [f"**Pre-optimisation HLO** (platform-independent: what the code asks for; "
            f"every op unfused): {pre['kernels']:,} ops, {_mb(pre['bytes'])} MB of "
            f"outputs; matmuls {pre['by_kind'].get('matmul', {}).get('count', 0)} ops, "
            f"{_mb(pre['matmul_bytes'])} MB; non-matmul compute (reshape/broadcast "
            f"excluded) {_mb(non_mm)} MB.", ""]
  head = "| {} | ops | out MB | " + ("out MB/sample | " if slope else "")
  for table, what in (("by_kind", "kind"), ("by_role", "role")):
    lines += [head.format(what) + "share of non-matmul MB |",
              "|---" * (4 + bool(slope)) + "|"]
    for k, v in sorted(pre[table].items(), key=lambda kv: -kv[1]["bytes"]):
      share = ("-" if table == "by_kind" and k in ("matmul", "attention", "reshape",
                                                   "broadcast")
               else f"{_non_mm_role_bytes(pre, table, k) / max(non_mm, 1):.1%}")
      per = f" {slope[table].get(k, 0.0) / 1e6:,.2f} |" if slope else ""
      lines.append(f"| {k} | {v['count']:,} | {_mb(v['bytes'])} |{per} {share} |")
    lines.append("")
  pre_batch = report.get("pre_batch", report["batch_size"])  # global: pre-SPMD shapes
  if slope and report.get("at_batch"):
    at = report["at_batch"]
    ext = extrapolate(pre, slope, pre_batch, at)
    total = sum(ext.values()) or 1.0
    kinds = {k: max(0.0, v["bytes"] - pre_batch * slope["by_kind"].get(k, 0.0))
             + at * slope["by_kind"].get(k, 0.0) for k, v in pre["by_kind"].items()}
    lines += [f"Extrapolated to global batch {at} (fixed + {at} x per sample): "
              f"non-matmul outputs {_mb(total)} MB: " + ", ".join(
                  f"{k} {v / total:.1%}" for k, v in sorted(ext.items(), key=lambda kv:
                                                             -kv[1]) if v / total >= 0.001)
              + f"; converts {kinds.get('convert', 0) / total:.1%}, transposes "
              f"{kinds.get('transpose', 0) / total:.1%} of them.", ""]
  pc, opt = pre["param_casts"], pre["optimizer"]
  lines += [f"- converts: {pre['converts']}; float32 params cast to low precision each "
            f"step: {pc['count']} casts, {_mb(pc['bytes'])} MB",
            f"- optimizer (optax: clipping, global norm, AdamW, apply): {opt['kernels']:,} "
            f"ops ({opt['kernels'] / max(report['param_leaves'], 1):.1f} per parameter "
            f"array), {_mb(opt['bytes'])} MB",
            f"- [B, B] tensors (B = global batch {pre_batch}; [per-device, B] too): "
            f"{pre['pair_logits']['count']} ops, {_mb(pre['pair_logits']['bytes'])} MB",
            "", "| top source lines (non-matmul) | role | ops | out MB |", "|---|---|---|---|"]
  lines += [f"| {s['source']} | {s['role']} | {s['count']} | {_mb(s['bytes'])} |"
            for s in pre["top_sources"]]
  post = report.get("compiled")
  if post:
    lines += ["", f"**Optimised HLO on {report['platform']}** (this backend's fusion "
              f"decisions; GPU's differ): {post['kernels']:,} kernels, in+out "
              f"{_mb(post['io_bytes'])} MB, non-matmul in+out "
              f"{_mb(post['non_matmul_io_bytes'])} MB; compile {report['compile_s']:.1f} s",
              "", "| kind | kernels | out MB | in+out MB |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['count']:,} | {_mb(v['bytes'])} | {_mb(v['io_bytes'])} |"
              for k, v in _sorted(post["by_kind"]).items()]
    lines += ["", "| non-matmul fusion kind | fusions | out MB | in+out MB |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['count']:,} | {_mb(v['bytes'])} | {_mb(v['io_bytes'])} |"
              for k, v in _sorted(post["non_matmul_fusions"]).items()]
    lines += ["", "| role | kernels | in+out MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['count']:,} | {_mb(v['io_bytes'])} |"
              for k, v in _sorted(post["by_role"]).items()]
    lines += ["", f"- optimizer: {post['optimizer']['kernels']} kernels "
              f"({post['optimizer']['by_opcode']}); [B, B] kernels: "
              f"{post['pair_logits']['count']}"]
  return "\n".join(lines)


def _non_mm_role_bytes(summary, table, key):
  """Bytes of `key` in `table` (roles: its ops that are not matmuls or layout)."""
  if table == "by_kind":
    return summary[table][key]["bytes"]
  return summary.get("role_non_matmul", {}).get(key, summary[table][key]["bytes"])
