# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_followup.sh (not run on its own): what both GPU runs
# do alike. Before sourcing, a script sets DEFAULT_SECONDS (where it stops itself unless GPU_CHECK_SECONDS
# says otherwise).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-$DEFAULT_SECONDS}))
left() { echo $((deadline - $(date +%s))); }
# capped WANT: WANT seconds, or what is left before the deadline (keeping 10 s to pack up), at least 1
capped() { local l=$(($(left) - 10)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
stamp() { echo "=== $1 at $(( $(date +%s) - start )) s"; }

# The machine's versions, then manualbp installed (editable, no network: the machine has torch and triton).
install_manualbp() {
    $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    if ! $py -m pip install --quiet --no-deps --no-build-isolation -e . ; then
        # The source tree imports the kernels as manualbp.triton_kernels (pyproject.toml's package-dir).
        echo "editable install failed: using the source tree through a link manualbp/triton_kernels"
        ln -sfn ../triton_kernels manualbp/triton_kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    $py -c "import manualbp; print('manualbp', manualbp.__version__, 'from', manualbp.__file__, manualbp.config.get())"
    carried_cache
}

# Triton's cache: the one built without a GPU (benchmarks/precompile.py) where the run carried .triton-cache.tgz,
# unpacked into .triton-cache/ and used by every process (TRITON_CACHE_DIR); else a fresh one there. Every compile
# of every process is recorded (benchmarks/triton_cache_probe/sitecustomize.py) for cache_summary: loaded or
# compiled here.
carried_cache() {
    export TRITON_CACHE_DIR="$PWD/.triton-cache"
    if [ -f .triton-cache.tgz ]; then
        $py benchmarks/triton_cache.py unpack .triton-cache.tgz "$TRITON_CACHE_DIR"
    else
        echo "triton cache: none carried (.triton-cache.tgz): every kernel compiles here"
    fi
    export TRITON_CACHE_EVENTS="$PWD/.triton-cache-events"
    : > "$TRITON_CACHE_EVENTS"
    export PYTHONPATH="$PWD/benchmarks/triton_cache_probe${PYTHONPATH:+:$PYTHONPATH}"
}

# How many kernels this run loaded from Triton's cache and how many it compiled (carried_cache's record).
cache_summary() {
    $py benchmarks/triton_cache.py summary "$TRITON_CACHE_EVENTS"
}

# run_tests LOG SECONDS WORKERS PER_TEST_S ARGS...: pytest on the compiled kernels with one fixed tile instead of
# autotuning each of hundreds of small test shapes (test_kernels.py checks every autotune config on its own),
# without the offline compile report's test (a CPU check); -v, each failure's traceback written as it happens
# (MANUALBP_FAILURE_LOG, tests/conftest.py), stopped by SIGINT at its limit so that pytest still prints its
# summary and its slowest tests; then a summary counted from the -v log. Returns pytest's status (124: stopped).
run_tests() {
    local log=$1 seconds=$2 workers=$3 per_test_s=$4
    shift 4
    local xdist="" per_test="" began rc progress
    $py -c "import xdist" 2>/dev/null && xdist="-n $workers"
    $py -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=$per_test_s"
    began=$(date +%s)
    MANUALBP_AUTOTUNE=0 MANUALBP_FAILURE_LOG="$out/gpu_failures.log" timeout -s INT -k 15 "$(capped "$seconds")" \
        $py -m pytest -v -rfE --durations=25 $xdist $per_test -p no:cacheprovider -m "not compile_report" "$@" \
        > "$log" 2>&1
    rc=$?
    echo "tests: exit $rc in $(( $(date +%s) - began )) s" \
         "$( [ $rc -eq 124 ] && echo '(STOPPED at its time limit: NOT COMPLETE)')"
    progress=$(grep -v -E '^(FAILED|ERROR) ' "$log")  # the -v lines, without -rfE's summary
    echo "tests: $(grep -c ' PASSED' <<<"$progress") passed, $(grep -c ' SKIPPED' <<<"$progress") skipped," \
         "$(grep -c ' XFAIL' <<<"$progress") xfailed, $(grep -c ' FAILED' <<<"$progress") failed," \
         "$(grep -c ' ERROR' <<<"$progress") errors (counted from the -v log)"
    grep -oE '(FAILED|ERROR) tests/[^ ]+' "$log" | sort -u | head -60
    [ -s "$out/gpu_failures.log" ] && echo "(each failure's traceback, written as it happened: gpu_failures.log)"
    sed -n '/slowest 25 durations/,/^$/p' "$log" | head -30
    tail -3 "$log"
    return $rc
}

# The run's start: the GPU's state, manualbp installed, and $gpu, the card's name as the benchmarks' files end with it
# (bench_dense.device_stem).
start_run() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv,noheader
    install_manualbp || return 1
    gpu=$($py -c "import torch; print(''.join(c if c.isalnum() else '_' for c in torch.cuda.get_device_name()).strip('_')[:40])")
}
