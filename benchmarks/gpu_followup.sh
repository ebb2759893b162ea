#!/usr/bin/env bash
# The second run of a GPU lease, after gpu_check.sh (device tool: `bash benchmarks/gpu_followup.sh`,
# timeout_s = what the lease has left, less a start of ~30 s). It stops itself at GPU_CHECK_SECONDS (default 220 s,
# what a 900 s lease has left after gpu_check.sh and two starts; set it to timeout_s - 20 otherwise):
#   1. install manualbp (as gpu_check.sh);
#   2. the tests gpu_check.sh leaves out: test_special_values.py (NaN, inf, -0.0 and subnormals through every
#      activation, dtype and layer structure, against nn.Linear + the activation), on all but two of the
#      machine's cores (its cases compile kernel variants on a bare machine: that is its time);
#   3. with the time left, gpu_check.sh's test files again (a failure there can be rerun here by name:
#      GPU_FOLLOWUP_TESTS="tests/test_x.py::test_y ...").
# Files in $OUT: gpu_followup.log (all of stdout), gpu_followup_tests.log, gpu_followup_rerun.log, gpu_failures.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-220}))
left() { echo $((deadline - $(date +%s))); }
budget() { local l=$(($(left) - 10)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
stamp() { echo "=== $1 at $(( $(date +%s) - start )) s"; }

# pytest on the compiled kernels, one fixed tile (as gpu_check.sh), stopped by SIGINT at its limit so that it
# still prints its summary and slowest tests: run_tests LOG SECONDS ARGS...
run_tests() {
    local log=$1 seconds=$2
    shift 2
    MANUALBP_AUTOTUNE=0 MANUALBP_FAILURE_LOG="$out/gpu_failures.log" timeout -s INT -k 15 "$(budget "$seconds")" \
        $py -m pytest -v -rfE --durations=25 $xdist $per_test -p no:cacheprovider -m "not compile_report" "$@" \
        > "$log" 2>&1
    local rc=$?
    local progress
    progress=$(grep -v -E '^(FAILED|ERROR) ' "$log")
    echo "tests: exit $rc $( [ $rc -eq 124 ] && echo '(STOPPED at its time limit: NOT COMPLETE)')"
    echo "tests: $(grep -c ' PASSED' <<<"$progress") passed, $(grep -c ' SKIPPED' <<<"$progress") skipped," \
         "$(grep -c ' XFAIL' <<<"$progress") xfailed, $(grep -c ' FAILED' <<<"$progress") failed," \
         "$(grep -c ' ERROR' <<<"$progress") errors (counted from the -v log)"
    grep -oE '(FAILED|ERROR) tests/[^ ]+' "$log" | sort -u | head -40
    sed -n '/slowest 25 durations/,/^$/p' "$log" | head -30
    tail -2 "$log"
    return $rc
}

main() {
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
$py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
if ! $py -m pip install --quiet --no-deps --no-build-isolation -e . ; then
    ln -sfn ../triton_kernels manualbp/triton_kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$py -c "import manualbp; print('manualbp', manualbp.__version__, manualbp.config.get())" || return 1
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
xdist="" per_test=""
$py -c "import xdist" 2>/dev/null && xdist="-n $workers"
$py -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=100"

stamp "special values"
run_tests "$out/gpu_followup_tests.log" 400 tests/test_special_values.py
tests_rc=$?
if [ "$(left)" -gt 40 ]; then
    stamp "the other tests again"
    run_tests "$out/gpu_followup_rerun.log" 400 ${GPU_FOLLOWUP_TESTS:---ignore=tests/test_special_values.py tests/}
fi
stamp "done"
return "$tests_rc"
}

main 2>&1 | tee -a "$out/gpu_followup.log"
exit "${PIPESTATUS[0]}"
