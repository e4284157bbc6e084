#!/usr/bin/env bash
# One-command GPU performance pass for issue 17 (one H100/H200, under 10 minutes).
#
#   tools/gpu_perf.sh [RESULTS_DIR]               # on the GPU machine
#   tools/gpu_perf.sh --cpu_smoke [RESULTS_DIR]   # the same runs on tiny CPU configs
#   tools/gpu_perf.sh --dry_run                   # print the runs; runs and writes nothing
#   tools/gpu_perf.sh --xla_flags                 # print the XLA flags it measures
#
# On the lent device machine (the `device` tool's `run`; 600 s per command at most, no
# network; only up to 8 files come back from $OUT, 2 folders deep at most):
#   1. Here, once, in the repo root: the device's python3 (Python 3.12, jax 0.11.2 for
#      CUDA 13, flax, optax, absl-py, einops, numpy, pyyaml preinstalled) lacks
#      ml_collections; carry it as a wheel:
#        echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp -d .whl ml_collections==1.1.0
#   2. run(command="tools/gpu_perf.sh", carry=[".whl"], timeout_s=600)
#   The script installs .whl/*.whl into a temporary folder when a module is missing, and
#   stops in seconds (exit 3) naming what is missing and how to carry it, or (exit 2)
#   when jax sees no GPU, so no device time goes on runs that cannot work. Do not carry
#   .venv: it is this machine's (CPU jaxlib 0.10.2) and too big.
#
# Results: everything is written to a working folder (WORK_DIR, default a new
# /tmp/gpu_perf.XXXXXX); RESULTS_DIR (default $OUT if set, else results/gpu_perf) gets,
# after EVERY run (so a kill at the command's limit loses nothing already measured):
#   table.md            variant, batch, samples/s, ratio to its baseline, MFU, compile s,
#                       peak memory (a failed or skipped run says so)
#   env.txt             python, jax/jaxlib/flax versions, devices, nvidia-smi, XLA flags
#                       and which flag variants this jax rejected
#   breakdown_b256.md, breakdown_b512.md   tools/profile_summary.py on the profiled runs:
#                       time per kind of work and per part of the step, busy vs idle, top ops
#   progress.log        this script's progress lines
#   files.tar.gz        every run's NAME.json (tools/benchmark.py's record), NAME.log, NAME.rc,
#                       NAME.base and the profile folders' summary.md / hlo.txt; no raw traces
#
# Time: the whole script ends by DEADLINE_S (570) seconds after its start. A run starts
# only if at least MIN_RUN_S (60) remain after keeping RESERVE_S (20; plus SUMMARY_S, 45,
# for a profiled run) for writing results; its timeout is min(RUN_TIMEOUT_S (150; CoCa
# COCA_TIMEOUT_S, 240, its compile is slow), what remains). Runs, most important first
# (clip_b16 = configs/clip_b16.py: bf16, fused QKV, cuDNN attention under `auto`; every
# run a fresh tools/benchmark.py process with --config.compilation_cache_dir= so that no
# run loads another's compiled program or GPU autotuning, and a variant's XLA flags apply
# to it alone):
#   clip_b256 (profiled: the breakdown), siglip_b256, coca_b256, clip_b512 (profiled),
#   then one change at a time against clip_b16 at the same batch: the latency-hiding
#   scheduler, attention_impl=xla, remat=dots_saveable at 512, Triton GEMM off, cuDNN GEMM
#   fusions, command buffers off, batch 1024 with remat=dots_saveable (vs 512 without),
#   and clip_b256 again (the baseline's drift over the run).
# Environment: PYTHON (default .venv/bin/python if present, else python3), STEPS (10).
#
# Rough expectations from README "Performance" (one H200, jax 0.11.2): clip_b16 256
# about 2,460 samples/s (30.7% MFU), 512 about 2,620 (32.6%); attention_impl=xla about
# 0.79x; compile 26-31 s per run. From tools/hlo_report.py on CPU (not yet measured on
# a GPU): the optimizer update is ~28 ops per parameter array before fusion over 301
# arrays, so look for hundreds of small kernels (a few ms per step) in the breakdown's
# top ops; float32 -> bf16 parameter casts are ~300 MB a step (well under 1 ms);
# the [B, B] logits are ~1 MB at batch 512 (negligible on one GPU).
#
# XLA flag names were checked against the pinned jaxlib (0.10.2) here (XLA rejects
# unknown names at start-up; tests/test_hlo_stats.py re-checks them). The device's
# jaxlib (0.11.2) may have renamed or dropped one: the script starts jax once with all
# of them and, if that fails, once per flag, and skips (table: "skipped (flag unknown
# ...)") the variants whose flag this jax rejects.
set -u -o pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

SMOKE=0
DRY=0
LIST_FLAGS=0
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --cpu_smoke) SMOKE=1 ;;
    --dry_run) DRY=1 ;;
    --xla_flags) LIST_FLAGS=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_perf.sh: unknown option '$arg'." >&2; usage >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
if (( ${#POSITIONAL[@]} > 1 )); then
  echo "gpu_perf.sh: one RESULTS_DIR at most, got: ${POSITIONAL[*]}" >&2; exit 2
fi

# name|XLA flags (for the --xla_flags listing and the flag variants below)
XLA_VARIANTS=(
  "lhs|--xla_gpu_enable_latency_hiding_scheduler=true"
  "triton_gemm_off|--xla_gpu_enable_triton_gemm=false"
  "cudnn_gemm_fusion|--xla_gpu_cudnn_gemm_fusion_level=2"
  "command_buffer_off|--xla_gpu_enable_command_buffer="
)
if [[ $LIST_FLAGS == 1 ]]; then
  for v in "${XLA_VARIANTS[@]}"; do echo "${v#*|}"; done
  exit 0
fi
xla_flag() {  # the flags of variant NAME
  local v
  for v in "${XLA_VARIANTS[@]}"; do [[ "${v%%|*}" == "$1" ]] && echo "${v#*|}"; done
}

cd "$(dirname "$0")/.." || exit 1
DIR="${POSITIONAL[0]:-${OUT:-results/gpu_perf}}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
STEPS="${STEPS:-10}"
DEADLINE_S="${DEADLINE_S:-570}"
RESERVE_S="${RESERVE_S:-20}"
SUMMARY_S="${SUMMARY_S:-45}"
MIN_RUN_S="${MIN_RUN_S:-60}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-150}"
COCA_TIMEOUT_S="${COCA_TIMEOUT_S:-240}"
WARMUP=2
PROFILE_STEPS=3
B256=256; B512=512; B1024=1024
SUFFIX=""
COMMON="--config.model.dtype=bfloat16 --config.model.fused_qkv=True"
COMMON+=" --config.compilation_cache_dir="  # every run compiles (and autotunes) afresh
if [[ $SMOKE == 1 ]]; then  # tiny models of the same families on the CPU
  SUFFIX=":runlocal"; B256=8; B512=16; B1024=32
  STEPS=2; WARMUP=1; PROFILE_STEPS=1
  DEADLINE_S="${DEADLINE_S_SMOKE:-100000}"  # a shared CPU compiles slowly
  RUN_TIMEOUT_S="${RUN_TIMEOUT_S_SMOKE:-1200}"; COCA_TIMEOUT_S="$RUN_TIMEOUT_S"
  export JAX_PLATFORMS=cpu
fi
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

if [[ $DRY == 0 ]]; then
  WORK="${WORK_DIR:-$(mktemp -d /tmp/gpu_perf.XXXXXX)}"
  mkdir -p "$WORK" "$DIR" || exit 1
fi
say() {
  echo "$*" >&2
  if [[ $DRY == 0 ]]; then echo "[$(elapsed)s] $*" >> "$WORK/progress.log"; fi
}

# Copy what the device tool can bring back (8 files, flat) into DIR; atomically.
publish() {
  local f
  for f in table.md env.txt progress.log breakdown_b256.md breakdown_b512.md; do
    [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$DIR/.$f.tmp" && mv "$DIR/.$f.tmp" "$DIR/$f"
  done
  (cd "$WORK" && tar -czf "$DIR/.files.tar.gz.tmp" --exclude='*.json.gz' \
      --exclude='*.pb' --exclude='site' \
      -- * 2>/dev/null) || return 0
  if (( $(stat -c %s "$DIR/.files.tar.gz.tmp") > 15000000 )); then  # 16 MiB come back
    (cd "$WORK" && tar -czf "$DIR/.files.tar.gz.tmp" --exclude='*.json.gz' \
        --exclude='*.pb' --exclude='site' --exclude='hlo.txt' -- * 2>/dev/null)
  fi
  mv "$DIR/.files.tar.gz.tmp" "$DIR/files.tar.gz"
}

# table.md from the runs so far (in the order they ran).
write_table() {
  "$PY" - "$WORK" > "$WORK/.table.md.tmp" <<'EOF' && mv "$WORK/.table.md.tmp" "$WORK/table.md"
import glob, json, os, sys
d = sys.argv[1]
read = lambda name: open(os.path.join(d, name)).read().strip() \
    if os.path.exists(os.path.join(d, name)) else ""
recs = {}
for path in sorted(glob.glob(os.path.join(d, "*.rc")), key=os.path.getmtime):
  name = os.path.basename(path)[:-3]
  rec = None
  lines = [l for l in read(name + ".json").splitlines() if l.startswith("{")]
  try:
    rec = json.loads(lines[-1]) if lines else None
  except ValueError:
    pass
  recs[name] = (read(name + ".rc"), rec, read(name + ".base"))
print("| variant | batch | samples/s | ratio | MFU | compile s | peak GB |")
print("|---|---|---|---|---|---|---|")
for name, (rc, rec, base) in recs.items():
  if rec is None:
    log = read(name + ".log")
    why = (log.splitlines()[0] if log.startswith("skipped") else
           f"timed out (rc {rc}; see {name}.log)" if rc in ("124", "137") else
           f"failed (rc {rc}; see {name}.log)")
    print(f"| {name} | - | {why} | - | - | - | - |")
    continue
  b = recs.get(base, (None, None))[1]
  ratio = (f"{rec['samples_per_s'] / b['samples_per_s']:.2f}x vs {base}"
           if b and base != name else "1.00x (baseline)" if base == name else
           f"- ({base} missing)")
  mem = rec.get("memory", {})
  peak = mem.get("allocator_peak_bytes_in_use", mem.get("peak_bytes_estimate"))
  print(f"| {name} | {rec['batch_size']} | {rec['samples_per_s']:,.1f} | {ratio} | "
        f"{rec['mfu']:.1%} | {rec['compile_s']:.1f} | "
        f"{'-' if peak is None else f'{peak / 1e9:.1f}'} |")
for b in (256, 512):
  text = read(f"breakdown_b{b}.md")
  if text:
    print(f"\nclip_b16 batch {b} breakdown (breakdown_b{b}.md):\n")
    print("\n".join(text.splitlines()[:14]))
EOF
}

skip() {  # NAME BASE WHY
  echo "skipped: $3" > "$WORK/$1.log"
  echo 124 > "$WORK/$1.rc"
  echo "$2" > "$WORK/$1.base"
  say "== $1: skipped ($3)"
}

# run NAME BASELINE CONFIG BATCH VARIANT [more benchmark.py args...]
# VARIANT: '' or an XLA_VARIANTS name. A run with --profile_dir=... is summarised at once.
run() {
  local name=$1 base=$2 cfg=$3 batch=$4 variant=$5
  shift 5
  local xla="" profile="" a
  [[ -n "$variant" ]] && xla="$(xla_flag "$variant")"
  local cmd=("$PY" tools/benchmark.py "--config=configs/${cfg}.py${SUFFIX}"
             "--config.batch_size=$batch" $COMMON --steps="$STEPS" --warmup="$WARMUP")
  for a in "$@"; do
    if [[ "$a" == --profile_dir=* ]]; then
      profile="${a#--profile_dir=}"
      [[ $DRY == 0 ]] && a="--profile_dir=$WORK/$profile"
    fi
    cmd+=("$a")
  done
  if [[ $DRY == 1 ]]; then
    echo "$name (vs $base): XLA_FLAGS='$xla' ${cmd[*]}"
    return
  fi
  if [[ -n "$variant" && " ${BAD_VARIANTS:-} " == *" $variant "* ]]; then
    skip "$name" "$base" "flag unknown to this jax: $xla"; finish_run; return
  fi
  local limit=$RUN_TIMEOUT_S reserve=$RESERVE_S
  [[ $cfg == coca_b16 ]] && limit=$COCA_TIMEOUT_S
  [[ -n "$profile" ]] && reserve=$(( RESERVE_S + SUMMARY_S ))
  local left=$(( DEADLINE_S - $(elapsed) - reserve ))
  if (( left < MIN_RUN_S )); then
    skip "$name" "$base" "budget (${left}s left of ${DEADLINE_S}s)"; finish_run; return
  fi
  (( limit > left )) && limit=$left
  say "== $name ($(elapsed)s elapsed, timeout ${limit}s)"
  echo "$base" > "$WORK/$name.base"
  # An empty or blank XLA_FLAGS is read as a file name by XLA: set it only if non-empty.
  local flags
  flags="$(echo "${XLA_FLAGS:-} $xla" | xargs)"
  if [[ -n "$flags" ]]; then
    XLA_FLAGS="$flags" timeout -k 5 "$limit" "${cmd[@]}" > "$WORK/$name.json" \
      2> "$WORK/$name.log"
  else
    env -u XLA_FLAGS timeout -k 5 "$limit" "${cmd[@]}" > "$WORK/$name.json" \
      2> "$WORK/$name.log"
  fi
  local rc=$?
  echo $rc > "$WORK/$name.rc"
  say "   $name: rc $rc after $(elapsed)s"
  if [[ -n "$profile" && -d "$WORK/$profile" ]]; then
    local t=$(( DEADLINE_S - $(elapsed) - RESERVE_S ))
    (( t > SUMMARY_S )) && t=$SUMMARY_S
    if (( t > 5 )); then
      timeout -k 5 "$t" "$PY" tools/profile_summary.py "$WORK/$profile" --top=30 \
        > "$WORK/breakdown_${profile#profile_}.md" 2> "$WORK/breakdown_${profile#profile_}.log"
      say "   breakdown of $name: rc $? after $(elapsed)s"
    fi
  fi
  finish_run
}
finish_run() { write_table; publish; }

if [[ $DRY == 0 ]]; then
  say "gpu_perf: results in $DIR, work folder $WORK, python $PY"
  # Modules tools/benchmark.py needs; a carried .whl folder fills the gaps.
  NEEDED="jax jaxlib flax optax einops absl ml_collections numpy yaml msgpack etils"
  missing() {
    "$PY" -c "import importlib.util as u, sys; m = [n for n in sys.argv[1:] if
u.find_spec(n) is None]; print(' '.join(m))" $NEEDED 2>&1
  }
  MISSING="$(missing)"
  if [[ -n "$MISSING" ]] && compgen -G ".whl/*.whl" > /dev/null; then
    say "missing: $MISSING; installing .whl/*.whl into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl >> "$WORK/progress.log" 2>&1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    MISSING="$(missing)"
  fi
  if [[ -n "$MISSING" ]]; then
    say "gpu_perf: $PY lacks: $MISSING. Carry them as wheels: here, in the repo root,
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
    --implementation cp -d .whl PACKAGE==VERSION   # ml_collections==1.1.0 (see setup.py)
then run tools/gpu_perf.sh with carry=['.whl'] (or set PYTHON to an interpreter with them)."
    publish; exit 3
  fi
  # One python start: versions, devices, the project's imports, and a GPU (exit 2 if none).
  ENV_OUT="$(timeout 180 "$PY" -c "import sys, jax, jaxlib, flax, optax
print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__,
      'flax', flax.__version__, 'optax', optax.__version__)
print(jax.devices())
import vlp_jax.perf.benchmark, vlp_jax.models.coca, vlp_jax.perf.trace_summary
sys.exit(0 if sys.argv[1] == '1' or jax.default_backend() == 'gpu' else 2)" "$SMOKE" 2>&1)"
  ENV_RC=$?
  { echo "date: $(date -u)"; echo "XLA_FLAGS=${XLA_FLAGS:-}"; echo "smoke=$SMOKE";
    echo "python: $PY ($(command -v "$PY"))"; echo "$ENV_OUT" | grep -v "^[IW][0-9]";
    command -v nvidia-smi > /dev/null && nvidia-smi 2>&1 | head -15; } > "$WORK/env.txt"
  if (( ENV_RC == 2 )); then
    say "jax sees no GPU (see env.txt): use a python with jax for CUDA, or --cpu_smoke."
    publish; exit 2
  elif (( ENV_RC != 0 )); then
    say "gpu_perf: $PY cannot import the project (rc $ENV_RC; versions differ from
setup.py's pins?): $(echo "$ENV_OUT" | tail -5)"
    publish; exit 3
  fi
  # Flag names this jax knows: one start with all of them; per flag only if that fails.
  probe() { XLA_FLAGS="$(echo "${XLA_FLAGS:-} $*" | xargs)" timeout 120 "$PY" -c \
    "import jax; jax.numpy.zeros(1).block_until_ready()" > /dev/null 2>&1; }
  BAD_VARIANTS=""
  if [[ $SMOKE == 0 ]] && ! probe $(for v in "${XLA_VARIANTS[@]}"; do echo "${v#*|}"; done)
  then
    for v in "${XLA_VARIANTS[@]}"; do
      probe "${v#*|}" || BAD_VARIANTS+=" ${v%%|*}"
    done
  fi
  echo "XLA flag variants this jax rejects:${BAD_VARIANTS:- none}" >> "$WORK/env.txt"
  say "setup done after $(elapsed)s; rejected flag variants:${BAD_VARIANTS:- none}"
  publish
fi

# Most important first: the later ones are the first skipped when time runs short.
run clip_b256 clip_b256 clip_b16 $B256 "" --profile_dir=profile_b256 \
  --profile_steps=$PROFILE_STEPS
run siglip_b256 siglip_b256 siglip_b16 $B256 ""
run coca_b256 coca_b256 coca_b16 $B256 ""
run clip_b512 clip_b512 clip_b16 $B512 "" --profile_dir=profile_b512 \
  --profile_steps=$PROFILE_STEPS
run xla_lhs_b256 clip_b256 clip_b16 $B256 lhs
run attn_xla_b256 clip_b256 clip_b16 $B256 "" --config.model.attention_impl=xla
run remat_dots_b512 clip_b512 clip_b16 $B512 "" --config.model.remat=dots_saveable
run xla_triton_gemm_off_b256 clip_b256 clip_b16 $B256 triton_gemm_off
run xla_cudnn_gemm_fusion_b256 clip_b256 clip_b16 $B256 cudnn_gemm_fusion
run xla_command_buffer_off_b256 clip_b256 clip_b16 $B256 command_buffer_off
run remat_dots_b1024 clip_b512 clip_b16 $B1024 "" --config.model.remat=dots_saveable
run clip_b256_again clip_b256 clip_b16 $B256 ""

[[ $DRY == 1 ]] && exit 0
cat "$WORK/table.md"
say "total $(elapsed)s; results in $DIR (everything in $WORK)"
publish
