#!/usr/bin/env bash
# GPU validation in one go (DESIGN.md "GPU validation"): versions, in-place build of effkern._C,
# pytest -m gpu, the quick benchmark (+ policy). For a machine with a preinstalled torch and no
# network; under 8 minutes on an H100. Every step has a time limit and a failed step does not
# stop the next one (without _C the Triton rows still run). The summary comes last.
#
#   bench/gpu_check.sh                 logs in bench/results/gpu_check/, results in bench/results/<gpu>/
#   OUT=/some/dir bench/gpu_check.sh   logs, results.tgz and the policy file in /some/dir
#   OPS="int8 int4" bench/gpu_check.sh only these op families' GPU tests (tests/test_<op>.py,
#                                      tests/test_<op>_*.py, and the harness's tests/test_bench.py)
#                                      and benchmarks (default: all)
#   STEPS="build pytest" bench/gpu_check.sh   only these of the steps build, pytest, bench (default
#                                      all three): a family's tests and its benchmark can then go in
#                                      two device calls, each within the per-call limit
#   TEST_MARK="gpu and smoke" bench/gpu_check.sh   the pytest step's -m expression (default gpu):
#                                      "gpu and smoke" runs the few tests per family that check each
#                                      kernel against float64 or bit for bit, every family in one call
# Per-step limits (seconds): BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PY=${PY:-python3}  # the GPU machines' python3 is the one with torch
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS
OPS=${OPS:-}
STEPS=${STEPS:-build pytest bench}
for s in $STEPS; do
    [[ $s == build || $s == pytest || $s == bench ]] || { echo "STEPS: unknown step '$s' (build, pytest, bench)"; exit 2; }
done
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
TEST_PATHS=tests
# with OPS, also the harness's own GPU test (its CUDA-graph timing; seconds)
# (|| true: ls fails on a family without test_<op>_*.py files, which set -e must not take as fatal)
if [[ -n $OPS ]]; then
    TEST_PATHS="$(for op in $OPS; do ls tests/test_"$op".py tests/test_"$op"_*.py 2>/dev/null || true; done) tests/test_bench.py"
fi
SUMMARY=()

# step NAME LIMIT LOG CMD...: run CMD with a time limit, log to LOG, record status and duration
step() {
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc=0 status=ok
    shift 3
    echo "== $name (limit ${limit}s) -> $log"
    timeout -k 15 "$limit" "$@" > "$log" 2>&1 || rc=$?
    if ((rc == 124 || rc == 137)); then status="TIMEOUT ${limit}s"; elif ((rc != 0)); then status="FAILED rc=$rc"; fi
    SUMMARY+=("$(printf '%-8s %-16s %5ss' "$name" "$status" $((SECONDS - t0)))")
    if ((rc != 0)); then
        echo "== $name: $status; last lines of $log:"
        tail -n 30 "$log"
    fi
}

env_info() {
    nvidia-smi || true
    $PY --version
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    nvcc --version || true
    git rev-parse HEAD 2>/dev/null || true
}

# The build's status; effkern.info() after it either way, to show what loads. Compiled for this
# GPU only (EFFKERN_CUDA_ARCH, unless set: 9.0a on Hopper), half the compile time of the default
# two architectures. If it fails, effkern is installed without _C, so that the Triton rows still
# run (effkern.kernels exists only in an installed effkern).
GPU_ARCH_PY='import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}.{minor}" + ("a" if major == 9 else ""))'
export GPU_ARCH_PY
build() {
    local rc=0
    if [[ -z ${EFFKERN_CUDA_ARCH:-} ]]; then
        EFFKERN_CUDA_ARCH=$($PY -c "$GPU_ARCH_PY" 2>/dev/null || true)
        export EFFKERN_CUDA_ARCH
    fi
    echo "building for EFFKERN_CUDA_ARCH=${EFFKERN_CUDA_ARCH:-unset, the default of setup.py}"
    MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . || rc=$?
    if ((rc != 0)); then
        echo "== the build failed (rc=$rc): installing effkern without _C for the Triton rows"
        EFFKERN_NO_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e . || true
    fi
    $PY -c "import effkern; effkern.info()" || true
    return $rc
}

export -f env_info build  # timeout runs programs, not shell functions: run them in a child bash
step env 60 "$OUT/env.txt" bash -c env_info
if wanted build; then step build "${BUILD_TIMEOUT:-150}" "$OUT/build.log" bash -c build; fi
# torch.compile in the tests compiles in-process: with torch 2.11, a pytest run whose tests had
# started inductor's compile-worker pool hung 300 s at exit shutting it down (seen twice in
# make test-gpu-stack), which would spend a step's limit after its tests were done
export TORCHINDUCTOR_COMPILE_THREADS=1
# pytest-xdist, where installed, spreads the Triton compiles of the GPU tests over the cores
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || true)
if wanted pytest; then
    # the slowest tests in the log: what to split off when a family's tests outgrow one call
    step pytest "${TEST_TIMEOUT:-150}" "$OUT/pytest_gpu.log" $PY -m pytest -m "${TEST_MARK:-gpu}" -q -rfEs --durations=25 $XDIST $TEST_PATHS
fi
SLUG=$($PY -c "from bench.harness import device_slug; print(device_slug())" || echo unknown-device)
RES=bench/results/$SLUG
# the named families that have a benchmark (all five have one)
BENCH_OPS=$($PY -c "import sys; from bench.__main__ import OPS; print(' '.join(o for o in sys.argv[1:] if o in OPS))" $OPS)
# this run's result files only: $RES also holds earlier runs' committed files
NEW_RESULTS=()
if wanted bench && [[ -z $OPS || -n $BENCH_OPS ]]; then
    # the autotuners' choices go to bench.log: which tile configs the numbers were measured at
    export TRITON_PRINT_AUTOTUNING=1
    step bench "${BENCH_TIMEOUT:-240}" "$OUT/bench.log" $PY -m bench $BENCH_OPS --quick --write-policy --out "$RES"
    # (written after env.txt: $RES may hold a committed earlier run's files of an op this run did not reach)
    for op in ${BENCH_OPS:-$($PY -c "from bench.__main__ import OPS; print(' '.join(OPS))")}; do
        while IFS= read -r f; do NEW_RESULTS+=("$f"); done < <(find "$RES" -maxdepth 1 -name "$op.*" -newer "$OUT/env.txt" | sort)
    done
fi

# the device tool returns few files: one tarball with this run's results and the policies
tar -czf "$OUT/results.tgz" ${NEW_RESULTS[@]+"${NEW_RESULTS[@]}"} effkern/policies 2>/dev/null || echo "tar: nothing to pack"
cp effkern/policies/*.json "$OUT/" 2>/dev/null || echo "no effkern/policies/*.json"

# this run's benchmark tables, then the summary, last
{
    tables=0
    for f in ${NEW_RESULTS[@]+"${NEW_RESULTS[@]}"}; do [[ $f == *.md ]] && cat "$f" && echo && tables=1; done
    ((tables)) || echo "no benchmark tables from this run"
    echo
    echo "================ gpu_check summary ($((SECONDS - START)) s, $(head -c 80 < <(grep -m1 '^device' "$OUT/env.txt" || echo 'device ?')))"
    printf '%s\n' "${SUMMARY[@]}"
    if wanted pytest; then
        echo "pytest: $(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$OUT/pytest_gpu.log" | tail -n 1 || echo 'no summary line')"
    fi
    if wanted bench; then echo "bench:  $(grep -E 'FAIL or ERROR|^skipped' "$OUT/bench.log" | tr '\n' ';' || true)"; fi
} | tee "$OUT/summary.txt"
