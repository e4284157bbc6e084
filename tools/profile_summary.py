"""Where the step time goes, from a jax.profiler trace: per kind of work and per op.

    python tools/profile_summary.py WORKDIR/profile            # trainer, profile_steps
    python tools/profile_summary.py /tmp/prof                  # tools/benchmark.py --profile_dir
    python tools/profile_summary.py TRACE.trace.json.gz --hlo=hlo.txt --top=40

Reads the newest `*.trace.json.gz` under the path. With the compiled HLO (found as
`hlo.txt` in the directory, as tools/benchmark.py writes it, or given with --hlo),
fusions are classified by the ops they contain (a fusion holding a dot is a matmul);
without it, by kernel and op names. Prints markdown; --json prints the full summary.
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlp_jax.perf import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position

_HLO = flags.DEFINE_string("hlo", "", "Compiled HLO text (default: PATH/hlo.txt if any).")
_TOP = flags.DEFINE_integer("top", 25, "Ops listed.")
_JSON = flags.DEFINE_bool("json", False, "Print the full summary as JSON instead.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Give one path: a profile directory or a *.trace.json.gz file.")
  path = argv[1]
  if not os.path.exists(path):
    raise app.UsageError(f"{path} does not exist.")
  trace = trace_summary.find_trace(path)
  hlo_path = _HLO.value or (os.path.join(path, "hlo.txt") if os.path.isdir(path) else "")
  hlo = ""
  if hlo_path and os.path.exists(hlo_path):
    with open(hlo_path) as f:
      hlo = f.read()
  elif _HLO.value:
    raise app.UsageError(f"--hlo={_HLO.value} does not exist.")
  summary = trace_summary.summarize(trace_summary.load_events(trace), hlo)
  summary["trace"], summary["hlo"] = trace, hlo_path if hlo else None
  if _JSON.value:
    print(json.dumps(summary, indent=1))
  else:
    print(f"{trace}\n")
    print(trace_summary.markdown(summary, _TOP.value))


if __name__ == "__main__":
  app.run(main)
