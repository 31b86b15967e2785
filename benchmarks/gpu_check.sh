#!/usr/bin/env bash
# The first hour on a lent GPU (H100/H200), in one script that finishes in at most 8 minutes: every step
# has a timeout (45 + 140 + 190 + 90 s, plus a few seconds of environment), set STEP_SCALE to stretch.
#
#   benchmarks/gpu_check.sh [--smoke] [OUT_DIR]
#
# Writes everything under OUT_DIR (default benchmarks/results/<date>-gpu-check-<gpu>), ready to commit:
#   env.txt              device, driver, CUDA, Python and package versions, git revision, command
#   compile.md/.json     compile_check for sm_90a (the static report, from this machine's Triton)
#   pytest-gpu.txt       CUDA parity tests, the bf16 sharp case included (pytest -m gpu tests/kernels)
#   bench-attention.*    kernel bench at 8k and 32k: dense, density 0.3 and 0.1; fwd, fwd+bwd, decode;
#                        triton vs flex (same mask and score), SDPA flash and cuDNN
#   gravity2-bench/      the whole-model bench on a random Gravity-2-shaped model
#                        (gravity-sparse run pipelines/gravity2-h100.yaml --stages bench
#                        bench.synthetic=gravity2)
#   summary.md           one line per step: status, seconds, where its output is
# A failing or timed-out step is recorded and the script goes on; the exit status is the number of
# failed steps (0 = all passed).
#
# The GPU machine has torch 2.11 / triton 3.6 / transformers 5.17 / peft but no internet and neither
# dimod nor dwave-samplers. Before lending, on a machine with internet, fill benchmarks/wheels/ (ignored
# by git: do not commit wheels) and carry it along:
#
#   pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 -d benchmarks/wheels dimod dwave-samplers
#
# (match --python-version to the GPU machine's Python; benchmarks/wheels/.gitignore keeps the wheels out
# of git). The script installs them with
# `pip install --no-index --find-links benchmarks/wheels` when they are missing.
#
# --smoke: the CPU dry run the test suite runs (tests/kernels/test_gpu_check.py): the same steps at toy
# sizes where they can run without CUDA (bench_attention --smoke), the others recorded as skipped.
# Environment: PYTHON (default: python), STEP_SCALE (multiplies every step's timeout, default 1).
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
    shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 99
PY="${PYTHON:-python}"
SCALE="${STEP_SCALE:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
GPU_NAME="cpu"
if [[ $SMOKE == 0 ]] && command -v nvidia-smi >/dev/null; then
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9-')"
fi
OUT="${1:-benchmarks/results/$(date -u +%F)-gpu-check-${GPU_NAME}}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
FAILED=0
{
    echo "# gpu_check $(date -u +%FT%TZ)"
    echo
    echo "| step | status | seconds | output |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

# step NAME TIMEOUT_S OUTPUT_FILE CMD...: run with a timeout, log stdout+stderr, record the status
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS status
    limit=$((limit * SCALE))
    echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/commands.txt"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || FAILED=$((FAILED + 1))
    echo "| $name | $status | $((SECONDS - t0)) | $(basename "$log") |" >>"$SUMMARY"
    echo "   -> $status ($((SECONDS - t0)) s)"
}

skip() {
    echo "| $1 | skipped: $2 | 0 | |" >>"$SUMMARY"
    echo "== $1: skipped ($2)"
}

# 1. environment
{
    echo "command: $0 $*"
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    if [[ $SMOKE == 0 ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
        nvidia-smi -q | grep -E "CUDA Version|Product Name|MIG Mode" -A0
    else
        echo "gpu: none (smoke run)"
    fi
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("torch", "triton", "transformers", "peft", "safetensors", "dimod", "dwave.samplers"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", type(err).__name__)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
print("cudnn", torch.backends.cudnn.version())
EOF
} >"$OUT/env.txt" 2>&1
echo "| environment | ok | 0 | env.txt |" >>"$SUMMARY"

# 2. wheels the device lacks (dimod, dwave-samplers) from the carried folder
if "$PY" -c "import dimod, dwave.samplers" 2>/dev/null; then
    skip "install dimod/dwave-samplers" "already installed"
elif compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    step "install dimod/dwave-samplers" 60 "$OUT/pip-wheels.txt" \
        "$PY" -m pip install --no-index --find-links benchmarks/wheels dimod dwave-samplers
else
    skip "install dimod/dwave-samplers" "no wheels in benchmarks/wheels (see the pip download step)"
fi

# 3. static compile report with this machine's Triton (no GPU needed; fast subset; smoke: fwd only)
ONLY=()
[[ $SMOKE == 1 ]] && ONLY=(--kernels fwd)
step "compile check sm_90a" 45 "$OUT/compile-log.txt" \
    env -u TRITON_INTERPRET "$PY" -m gravity_sparse.kernels.compile_check --arch 90 --quiet --jobs 2 \
    --out "$OUT/compile.md" "${ONLY[@]}"

if [[ $SMOKE == 1 ]]; then
    skip "pytest -m gpu tests/kernels" "no GPU (smoke)"
    step "bench_attention (smoke)" 120 "$OUT/bench-attention-log.txt" \
        "$PY" benchmarks/bench_attention.py --smoke --out "$OUT/bench-attention" --modes fwd decode
    skip "gravity2 whole-model bench" "no GPU (smoke)"
else
    # 4. CUDA parity tests, sharp case included
    step "pytest -m gpu tests/kernels" 140 "$OUT/pytest-gpu.txt" \
        "$PY" -m pytest -q -m gpu tests/kernels -p no:cacheprovider -rs
    # 5. kernel bench: 8k and 32k, dense / 0.3 / 0.1, fwd / fwd+bwd / decode, head_dim 128, block 64
    step "bench_attention 8k/32k" 190 "$OUT/bench-attention-log.txt" \
        "$PY" benchmarks/bench_attention.py --seq-lens 8192 32768 --head-dims 128 \
        --densities 1.0 0.3 0.1 --modes fwd fwdbwd decode --block-size 64 \
        --warmup 10 --rep 40 --out "$OUT/bench-attention"
    # 6. whole-model bench on a random Gravity-2-shaped model
    step "gravity2 whole-model bench" 90 "$OUT/gravity2-bench-log.txt" \
        "$PY" -m gravity_sparse run pipelines/gravity2-h100.yaml --stages bench \
        bench.synthetic=gravity2 "run_dir=$OUT/gravity2-bench" \
        "bench.prefill_lengths=[8192,32768]" bench.repeats=3 bench.decode_tokens=32
fi

echo >>"$SUMMARY"
echo "total $(( $(date +%s) - START )) s, $FAILED failed step(s); smoke=$SMOKE" >>"$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
