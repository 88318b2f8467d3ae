#!/usr/bin/env bash
# scripts/gpu_check.sh - the GPU validation run of rellax-fast on one lent H100/H200 (no internet).
# The long, full version: a short GPU window runs scripts/gpu_lean.py (the headline numbers first) instead.
#
# Uses the machine's python with its preinstalled torch, triton, transformers and peft (no venv, no pip
# downloads). Steps, each time-boxed; a failing step is recorded and the next one still runs:
#   env           nvidia-smi, versions, nvcc
#   build         rellax_fast._C in place with CUDA (TORCH_CUDA_ARCH_LIST=9.0a, RELLAX_BUILD_CUDA=1, MAX_JOBS=16)
#   install       optional (PIP_INSTALL=1): pip install --no-build-isolation --no-deps --no-index -e .
#   info          `rellax-fast info`, and a check that _C was built with CUDA
#   test-cuda     pytest -m cuda, the CUDA C++ kernels (tests whose id does not contain "triton")
#   test-triton   pytest -m cuda -k triton: the Triton kernels compiled on the GPU (TRITON_INTERPRET unset),
#                 incl. fp32 at r=128 (3xTF32 and TF32), decode with per-sample C, and tensors on cuda:1
#                 while cuda:0 is current (skipped on a one-GPU machine)
#   sanitizer     compute-sanitizer --tool memcheck on scripts/sanitizer_smoke.py (cflora, topk, dropout)
#   bench-cflora  rellax-fast bench cflora --size gpu
#   bench-topk    rellax-fast bench topk --size gpu
#   pytest-bench  pytest benchmarks --benchmark-only --bench-size gpu (pytest-benchmark; JSON in $OUT/pytest_benchmark.json)
#   bench-e2e     rellax-fast bench e2e --size 1b (set RELLAX_BENCH_EVAL_RUN=<run folder of `rellax-fast train`>
#                 to add the CTR scoring throughput of `rellax-fast eval` on that run)
#   benchmarks    the BENCHMARKS.md section (card, versions, date, command, tables) -> $OUT/BENCHMARKS_section.md,
#                 also appended to ./BENCHMARKS.md when APPEND_BENCHMARKS=1
# and ends with a summary table (step, status, seconds), also written to $OUT/summary.md.
#
# Usage:   bash scripts/gpu_check.sh                    everything, output in $OUT (else ./gpu_check_out)
#          DRY_RUN=1 bash scripts/gpu_check.sh          print the steps and commands, run nothing
#          STEPS=build,info,bench-e2e bash scripts/gpu_check.sh   a subset (e.g. a rerun)
# Knobs:   PYTHON, BUDGET_S (whole-run wall budget, default 465 s: the run must end within 8 minutes),
#          TORCH_CUDA_ARCH_LIST (9.0a), MAX_JOBS (16), CUDA_HOME (/usr/local/cuda), COMPUTE_SANITIZER,
#          BENCH_WARMUP (2), BENCH_REPEAT (5), PIP_INSTALL (0), APPEND_BENCHMARKS (0).
# Exit status: 0 when every step that ran passed, 1 otherwise.
# Not run here (notes for other machines):
#   - multi-GPU FSDP through accelerate (needs >= 2 GPUs; accelerate 1.15 enables its FSDP plugin only for
#     GPU-type launches, a CPU launch runs DDP): tests/train/distributed_worker.py trains the tiny model with
#     `ACCELERATE_USE_FSDP=true FSDP_VERSION=2 accelerate launch --num_processes 2 ...`; compare with the
#     single-process run as tests/train/test_distributed.py does (torch's fully_shard itself is tested on CPU/gloo).
#   - lifelong retrieval on the GPU backends: rellax-fast bench topk --lifelong --size gpu (L up to 32k).
#   - AUC against history length K (bench lifelong, #18) with a 1B+ causal backbone in bf16: longer than this
#     script's budget and needs the model's weights on the machine, so not a step here. Time it first, then run:
#       rellax-fast bench lifelong --preset gpu --model <local 1B+ causal folder> --estimate-steps 3 --out runs/ll-gpu
#       rellax-fast bench lifelong --preset gpu --model <local 1B+ causal folder> --out runs/ll-gpu
#     (K 5,10,20,30,50, 8,192 prompts per point, the whole test split; a rerun skips finished points).

set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

OUT_DIR="${OUT:-$REPO/gpu_check_out}"
LOG_DIR="$OUT_DIR/logs"
BENCH_DIR="$OUT_DIR/bench"
DRY_RUN="${DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-465}"
RESERVE_S=10           # kept back for the benchmarks section and the summary
MIN_STEP_S=15          # a step is skipped when less than this is left
ALL_STEPS="env,build,install,info,test-cuda,test-triton,sanitizer,bench-cflora,bench-topk,pytest-bench,bench-e2e,benchmarks"
STEPS="${STEPS:-$ALL_STEPS}"
PIP_INSTALL="${PIP_INSTALL:-0}"
APPEND_BENCHMARKS="${APPEND_BENCHMARKS:-0}"
ARCH="${TORCH_CUDA_ARCH_LIST:-9.0a}"
JOBS="${MAX_JOBS:-16}"
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
SANITIZER="${COMPUTE_SANITIZER:-$CUDA_ROOT/bin/compute-sanitizer}"
BENCH_WARMUP="${BENCH_WARMUP:-2}"
BENCH_REPEAT="${BENCH_REPEAT:-5}"
# the interpreter that imports a CUDA torch (on some GPU images only python3 has it), not a name
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for cand in python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \
            "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
            PY="$(command -v "$cand")"
            break
        fi
    done
    PY="${PY:-$(command -v python3 || command -v python || echo python3)}"
fi

# the in-place build is imported from the checkout; Triton must compile for the GPU, not interpret
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

mkdir -p "$LOG_DIR" "$BENCH_DIR"

START_NS=$(date +%s%N)
elapsed_s() { echo $(( ($(date +%s%N) - START_NS) / 1000000000 )); }

NAMES=()
RESULTS=()
SECONDS_TAKEN=()
record() { NAMES+=("$1"); RESULTS+=("$2"); SECONDS_TAKEN+=("$3"); }

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# run_step NAME CAP_SECONDS COMMAND...: time-boxed by min(CAP, what is left of BUDGET_S); output in logs/NAME.log
run_step() {
    local name="$1" cap="$2"
    shift 2
    wanted "$name" || return 0
    local log="$LOG_DIR/$name.log"
    local shown="$*"
    shown="${shown//$'\n'/ }"
    (( ${#shown} > 220 )) && shown="${shown:0:220}..."
    if [[ "$DRY_RUN" == "1" ]]; then
        printf '[dry-run] %-13s limit %4ss  %s\n' "$name" "$cap" "$shown"
        record "$name" "dry-run" 0
        return 0
    fi
    local left=$(( BUDGET_S - $(elapsed_s) - RESERVE_S ))
    if (( left < MIN_STEP_S )); then
        echo "=== [$name] skipped: ${left}s left of the ${BUDGET_S}s budget"
        record "$name" "skipped (budget)" 0
        return 0
    fi
    local limit=$(( cap < left ? cap : left ))
    echo "=== [$name] limit ${limit}s: $shown"
    local t0 rc status secs
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    secs=$(( ($(date +%s%N) - t0) / 1000000000 ))
    case "$rc" in
        0) status="pass" ;;
        124 | 137) status="timeout (${limit}s)" ;;
        5) status="fail (no tests collected)" ;;
        *) status="fail (rc $rc)" ;;
    esac
    if [[ "$status" == "pass" ]]; then
        tail -n "${TAIL_PASS:-4}" "$log" | sed 's/^/    /'
    else
        tail -n "${TAIL_FAIL:-30}" "$log" | sed 's/^/    /'
    fi
    echo "=== [$name] $status in ${secs}s (log: $log)"
    record "$name" "$status" "$secs"
}

RF=("$PY" -m rellax_fast.cli)
BENCH_COMMON=(--warmup "$BENCH_WARMUP" --repeat "$BENCH_REPEAT" --out "$BENCH_DIR")

ENV_SCRIPT='
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)"
nvidia-smi || echo "nvidia-smi failed"
"$0" -c "
import sys, torch
print(\"python\", sys.version.split()[0], \"at\", sys.executable)
print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"available:\", torch.cuda.is_available())
if torch.cuda.is_available():
    print(\"device\", torch.cuda.get_device_name(0), \"capability\", torch.cuda.get_device_capability(0))
from importlib.metadata import version
for m in (\"triton\", \"transformers\", \"peft\", \"sentence-transformers\", \"pytest\", \"ninja\"):
    try:
        print(m, version(m))
    except Exception as exc:
        print(m, \"MISSING:\", exc)
"
"$1/bin/nvcc" --version || echo "nvcc not found under $1"
if command -v ninja >/dev/null 2>&1; then echo "ninja $(ninja --version)"; else echo "ninja not found: the build compiles one file at a time"; fi
( git rev-parse HEAD && git status --short | head -n 20 ) 2>/dev/null || echo "(no git metadata)"
'

CHECK_CUDA_EXT='
from rellax_fast import _ext
mod = _ext.load()
assert mod is not None, f"rellax_fast._C did not load: {_ext.load_error()}"
assert mod.with_cuda(), "rellax_fast._C was built without CUDA"
print("rellax_fast._C with CUDA, archs", mod.cuda_archs())
'

echo "gpu_check: repo $REPO, output $OUT_DIR, python $PY, budget ${BUDGET_S}s, steps $STEPS"

run_step env 45 bash -c "$ENV_SCRIPT" "$PY" "$CUDA_ROOT"

run_step build 240 env TORCH_CUDA_ARCH_LIST="$ARCH" RELLAX_BUILD_CUDA=1 RELLAX_BUILD_EXT=1 MAX_JOBS="$JOBS" \
    CUDA_HOME="$CUDA_ROOT" "$PY" setup.py build_ext --inplace

if [[ "$PIP_INSTALL" == "1" ]]; then
    # the extension is already in place: RELLAX_BUILD_EXT=0 makes the editable install pure Python
    run_step install 90 env RELLAX_BUILD_EXT=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi

run_step info 60 bash -c 'py="$0" check="$1"; shift; "$@" info && "$py" -c "$check"' "$PY" "$CHECK_CUDA_EXT" "${RF[@]}"

run_step test-cuda 120 "$PY" -m pytest -m cuda -k "not triton" -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest_cuda.xml" tests

run_step test-triton 120 "$PY" -m pytest -m cuda -k triton -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest_triton_gpu.xml" tests

# no caching allocator: each tensor is its own allocation, so an access just past it is caught.
# CUDA API return codes that torch probes and handles itself are not memory errors: ignore them when the
# sanitizer can (kernel out-of-bounds/misaligned accesses are what this step is for).
SAN_FLAGS=(--tool memcheck --error-exitcode 1 --print-limit 50)
if [[ -x "$SANITIZER" ]] && "$SANITIZER" --help 2>/dev/null | grep -q -- "--report-api-errors"; then
    SAN_FLAGS+=(--report-api-errors no)
fi
run_step sanitizer 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" "${SAN_FLAGS[@]}" \
    "$PY" scripts/sanitizer_smoke.py

run_step bench-cflora 90 "${RF[@]}" bench cflora --size gpu "${BENCH_COMMON[@]}"
run_step bench-topk 90 "${RF[@]}" bench topk --size gpu "${BENCH_COMMON[@]}"
# pytest-benchmark is not in the GPU image, which has no internet: carry a wheelhouse made where pip works
# (`pip download pytest-benchmark py-cpuinfo -d wheelhouse`, then run with carry=["wheelhouse"]).
PYTEST_BENCH_SCRIPT='py="$0"; out="$1"
if ! "$py" -c "import pytest_benchmark" 2>/dev/null; then
  if [[ -d wheelhouse ]]; then "$py" -m pip install -q --no-index --find-links wheelhouse pytest-benchmark || exit 1
  else echo "pytest-benchmark is not installed and there is no ./wheelhouse: pip download pytest-benchmark py-cpuinfo -d wheelhouse"; exit 1; fi
fi
exec "$py" -m pytest benchmarks --benchmark-only --bench-size gpu --bench-device cuda -q -p no:cacheprovider \
  -k "not train_step" --benchmark-json="$out"'
run_step pytest-bench 120 bash -c "$PYTEST_BENCH_SCRIPT" "$PY" "$OUT_DIR/pytest_benchmark.json"
run_step bench-e2e 200 "${RF[@]}" bench e2e --size 1b "${BENCH_COMMON[@]}"

BENCH_COMMAND="bash scripts/gpu_check.sh (rellax-fast bench cflora --size gpu; rellax-fast bench topk --size gpu; rellax-fast bench e2e --size 1b; each with --warmup $BENCH_WARMUP --repeat $BENCH_REPEAT)"
SECTION_ARGS=(--out-dir "$BENCH_DIR" --command "$BENCH_COMMAND" --section-file "$OUT_DIR/BENCHMARKS_section.md")
if [[ "$APPEND_BENCHMARKS" == "1" ]]; then
    SECTION_ARGS+=(--append-to "$REPO/BENCHMARKS.md")
fi
RESERVE_S=0 run_step benchmarks 30 "$PY" -m rellax_fast.bench.e2e benchmarks-section "${SECTION_ARGS[@]}"

# ------------------------------------------------------------------------------------------------ summary
failures=0
{
    echo "# gpu_check summary"
    echo
    echo "total $(elapsed_s)s of a ${BUDGET_S}s budget; output $OUT_DIR"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} |"
    done
} >"$OUT_DIR/summary.md"
echo
echo "================ gpu_check summary ($(elapsed_s)s, budget ${BUDGET_S}s) ================"
printf '%-14s %-28s %8s\n' "step" "status" "seconds"
for i in "${!NAMES[@]}"; do
    printf '%-14s %-28s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
    case "${RESULTS[$i]}" in
        pass | dry-run) ;;
        *) failures=$((failures + 1)) ;;
    esac
done
echo "logs: $LOG_DIR   reports: $BENCH_DIR   summary: $OUT_DIR/summary.md"
if (( failures > 0 )); then
    echo "gpu_check: $failures step(s) did not pass"
    exit 1
fi
echo "gpu_check: every step passed"
exit 0
