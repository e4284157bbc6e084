#!/usr/bin/env bash
# One-command GPU performance pass for issue 17 (one H100/H200, about 10 minutes).
#
#   tools/gpu_perf.sh [RESULTS_DIR]            # on the GPU machine
#   tools/gpu_perf.sh --cpu_smoke [RESULTS_DIR]   # the same runs on tiny CPU configs
#   tools/gpu_perf.sh --dry_run                # print the runs, run nothing
#   tools/gpu_perf.sh --xla_flags              # print the XLA flags it measures
#
# RESULTS_DIR defaults to $OUT if set, else results/gpu_perf. Environment: PYTHON (the
# interpreter, with jax for CUDA installed; default .venv/bin/python if present, else
# python3), STEPS (timed steps per run, 10), BUDGET_S (runs that would start after this
# many seconds are skipped, 470: the whole script stays under 10 minutes),
# RUN_TIMEOUT_S (per run, 150; RUN_TIMEOUT_S_SMOKE, 1200, with --cpu_smoke). Without
# --cpu_smoke it stops at once (exit 2) if jax sees no GPU, so no device time is spent
# on CPU runs.
#
# What it runs, in this order (clip_b16 = configs/clip_b16.py: bf16, fused QKV, cuDNN
# attention under `auto`; every run a fresh tools/benchmark.py process, so a variant's
# XLA flags apply to it alone):
#   1. clip_b16 batch 256 and 512 with --profile_dir: the step-time breakdown
#   2. siglip_b16 and coca_b16 at batch 256
#   3. one change at a time against clip_b16 at the same batch: XLA GPU flags
#      (latency-hiding scheduler, Triton GEMM off, cuDNN GEMM fusions, command buffers
#      off), attention_impl=xla, remat=dots_saveable at 512, batch 1024 with
#      remat=dots_saveable (against batch 512 without remat), and clip_b16 256 again
#      (the baseline's drift over the run).
#
# Expected outputs under RESULTS_DIR:
#   NAME.json           tools/benchmark.py's record for each run (samples_per_s, mfu,
#                       compile_s, memory, profile headline for the profiled runs)
#   NAME.log            its stderr; NAME.rc its exit status (non-zero: OOM / failure)
#   profile_b256/, profile_b512/   the jax.profiler trace, hlo.txt and summary.md
#   breakdown_b256.md, breakdown_b512.md   tools/profile_summary.py: time per kind of
#                       work (matmul, attention, elementwise, reduction, copy,
#                       collective), busy vs idle, top ops
#   table.md            one markdown table: variant, batch, samples/s, ratio to its
#                       baseline, MFU, compile s, peak memory; printed at the end too
#   env.txt             jax/jaxlib versions, nvidia-smi, XLA_FLAGS
# Rough expectations from README "Performance" (one H200, jax 0.11.2): clip_b16 256
# about 2,460 samples/s (30.7% MFU), 512 about 2,620 (32.6%); attention_impl=xla about
# 0.79x; compile 26-31 s per run. From tools/hlo_report.py on CPU (not yet measured on
# a GPU): the optimizer update is ~28 ops per parameter array before fusion over 301
# arrays, so look for hundreds of small kernels (a few ms per step) in the breakdown's
# top ops; float32 -> bf16 parameter casts are ~300 MB a step (well under 1 ms);
# the [B, B] logits are ~1 MB at batch 512 (negligible on one GPU).
#
# XLA flag names below were checked against the pinned jaxlib (0.10.2) by starting a
# CPU jax process with each in XLA_FLAGS (XLA rejects unknown names at start-up):
# `tools/gpu_perf.sh --xla_flags` lists them; tests/test_hlo_stats.py re-checks them.
set -u -o pipefail

SMOKE=0
DRY=0
case "${1:-}" in
  --cpu_smoke) SMOKE=1; shift ;;
  --dry_run) DRY=1; shift ;;
esac

# name|XLA flags (for the --xla_flags listing and the flag variants below)
XLA_VARIANTS=(
  "lhs|--xla_gpu_enable_latency_hiding_scheduler=true"
  "triton_gemm_off|--xla_gpu_enable_triton_gemm=false"
  "cudnn_gemm_fusion|--xla_gpu_cudnn_gemm_fusion_level=2"
  "command_buffer_off|--xla_gpu_enable_command_buffer="
)
if [[ "${1:-}" == "--xla_flags" ]]; then
  for v in "${XLA_VARIANTS[@]}"; do echo "${v#*|}"; done
  exit 0
fi

cd "$(dirname "$0")/.." || exit 1
DIR="${1:-${OUT:-results/gpu_perf}}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
STEPS="${STEPS:-10}"
BUDGET_S="${BUDGET_S:-470}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-150}"
WARMUP=2
PROFILE_STEPS=3
B256=256; B512=512; B1024=1024
SUFFIX=""
COMMON="--config.model.dtype=bfloat16 --config.model.fused_qkv=True"
if [[ $SMOKE == 1 ]]; then  # tiny models of the same families on the CPU
  SUFFIX=":runlocal"; B256=8; B512=16; B1024=32
  STEPS=2; WARMUP=1; PROFILE_STEPS=1
  RUN_TIMEOUT_S="${RUN_TIMEOUT_S_SMOKE:-1200}"  # a shared CPU compiles slowly
  export JAX_PLATFORMS=cpu
fi
mkdir -p "$DIR"
START=$(date +%s)

# run NAME BASELINE CONFIG BATCH XLA_FLAGS [more benchmark.py args...]
run() {
  local name=$1 base=$2 cfg=$3 batch=$4 xla=$5
  shift 5
  local cmd=("$PY" tools/benchmark.py "--config=configs/${cfg}.py${SUFFIX}"
             "--config.batch_size=$batch" $COMMON --steps="$STEPS" --warmup="$WARMUP" "$@")
  if [[ $DRY == 1 ]]; then
    echo "$name (vs $base): XLA_FLAGS='$xla' ${cmd[*]}"
    return
  fi
  local elapsed=$(( $(date +%s) - START ))
  if (( elapsed > BUDGET_S )); then
    echo "skipped: budget of ${BUDGET_S}s spent" > "$DIR/$name.log"
    echo 124 > "$DIR/$name.rc"
    echo "== $name: skipped (${elapsed}s elapsed)" >&2
    return
  fi
  echo "== $name (${elapsed}s elapsed)" >&2
  echo "$base" > "$DIR/$name.base"
  # An empty or blank XLA_FLAGS is read as a file name by XLA: set it only if non-empty.
  local flags
  flags="$(echo "${XLA_FLAGS:-} $xla" | xargs)"
  if [[ -n "$flags" ]]; then
    XLA_FLAGS="$flags" timeout "$RUN_TIMEOUT_S" "${cmd[@]}" > "$DIR/$name.json" \
      2> "$DIR/$name.log"
  else
    env -u XLA_FLAGS timeout "$RUN_TIMEOUT_S" "${cmd[@]}" > "$DIR/$name.json" \
      2> "$DIR/$name.log"
  fi
  echo $? > "$DIR/$name.rc"
}

if [[ $DRY == 0 ]]; then
  { echo "date: $(date -u)"; echo "XLA_FLAGS=${XLA_FLAGS:-}"; echo "smoke=$SMOKE";
    "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib',
jaxlib.__version__); print(jax.devices())" 2>&1;
    nvidia-smi 2>&1 | head -15; } > "$DIR/env.txt"
  if [[ $SMOKE == 0 ]] && ! "$PY" -c \
      "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "jax sees no GPU (see $DIR/env.txt): install jax for CUDA, or use --cpu_smoke." >&2
    exit 2
  fi
fi

# 1. the breakdown
run clip_b256 clip_b256 clip_b16 $B256 "" --profile_dir="$DIR/profile_b256" \
  --profile_steps=$PROFILE_STEPS
run clip_b512 clip_b512 clip_b16 $B512 "" --profile_dir="$DIR/profile_b512" \
  --profile_steps=$PROFILE_STEPS
# 2. the other families
run siglip_b256 siglip_b256 siglip_b16 $B256 ""
run coca_b256 coca_b256 coca_b16 $B256 ""
# 3. one change at a time
for v in "${XLA_VARIANTS[@]}"; do
  run "xla_${v%%|*}_b256" clip_b256 clip_b16 $B256 "${v#*|}"
done
run attn_xla_b256 clip_b256 clip_b16 $B256 "" --config.model.attention_impl=xla
run remat_dots_b512 clip_b512 clip_b16 $B512 "" --config.model.remat=dots_saveable
run remat_dots_b1024 clip_b512 clip_b16 $B1024 "" --config.model.remat=dots_saveable
run clip_b256_again clip_b256 clip_b16 $B256 ""

[[ $DRY == 1 ]] && exit 0

for b in 256 512; do
  if [[ -d "$DIR/profile_b$b" ]]; then
    "$PY" tools/profile_summary.py "$DIR/profile_b$b" --top=30 > "$DIR/breakdown_b$b.md" \
      2> "$DIR/breakdown_b$b.log"
  fi
done

"$PY" - "$DIR" <<'EOF' | tee "$DIR/table.md"
import glob, json, os, sys
d = sys.argv[1]
recs = {}
for path in sorted(glob.glob(os.path.join(d, "*.rc")), key=os.path.getmtime):
  name = os.path.basename(path)[:-3]
  rc = open(path).read().strip()
  rec = None
  try:
    with open(os.path.join(d, name + ".json")) as f:
      lines = [l for l in f.read().splitlines() if l.startswith("{")]
    rec = json.loads(lines[-1]) if lines else None
  except (OSError, ValueError):
    pass
  base = open(os.path.join(d, name + ".base")).read().strip() \
      if os.path.exists(os.path.join(d, name + ".base")) else ""
  recs[name] = (rc, rec, base)
print("| variant | batch | samples/s | ratio | MFU | compile s | peak GB |")
print("|---|---|---|---|---|---|---|")
for name, (rc, rec, base) in recs.items():
  if rec is None:
    why = "skipped (budget)" if rc == "124" and "skipped" in open(
        os.path.join(d, name + ".log")).read() else f"failed (rc {rc}; see {name}.log)"
    print(f"| {name} | - | {why} | - | - | - | - |")
    continue
  b = recs.get(base, (None, None))[1]
  ratio = (f"{rec['samples_per_s'] / b['samples_per_s']:.2f}x vs {base}"
           if b and base != name else "1.00x (baseline)")
  mem = rec.get("memory", {})
  peak = mem.get("allocator_peak_bytes_in_use", mem.get("peak_bytes_estimate"))
  print(f"| {name} | {rec['batch_size']} | {rec['samples_per_s']:,.1f} | {ratio} | "
        f"{rec['mfu']:.1%} | {rec['compile_s']:.1f} | "
        f"{'-' if peak is None else f'{peak / 1e9:.1f}'} |")
for b in (256, 512):
  p = os.path.join(d, f"breakdown_b{b}.md")
  if os.path.exists(p):
    print(f"\nclip_b16 batch {b} breakdown ({p}):\n")
    print("\n".join(open(p).read().splitlines()[:14]))
EOF
echo "total $(( $(date +%s) - START ))s; results in $DIR" >&2
