#!/usr/bin/env bash
# The second run on a GPU machine, after gpu_check.sh: `bash benchmarks/gpu_followup.sh`. It stops itself at
# GPU_CHECK_SECONDS (default 220 s: what is left of 15 minutes after gpu_check.sh; set it to the time you have):
#   1. install manualbp (as gpu_check.sh);
#   2. the tests gpu_check.sh leaves out: test_special_values.py (NaN, inf, -0.0 and subnormals through every
#      activation, dtype and layer structure, against nn.Linear + the activation), on all but two of the
#      machine's cores (its cases compile kernel variants on a bare machine: that is its time);
#   3. with the time left, gpu_check.sh's test files again (a failure there can be rerun here by name:
#      GPU_FOLLOWUP_TESTS="tests/test_x.py::test_y ...").
# Files in $OUT: gpu_followup.log (all of stdout), gpu_followup_tests.log, gpu_followup_rerun.log, gpu_failures.log.
DEFAULT_SECONDS=220
source "$(dirname "$0")/gpu_common.sh"

main() {
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
install_manualbp || return 1
workers=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))

stamp "special values"
run_tests "$out/gpu_followup_tests.log" 400 "$workers" 100 tests/test_special_values.py
tests_rc=$?
if [ "$(left)" -gt 40 ]; then
    stamp "the other tests again"
    run_tests "$out/gpu_followup_rerun.log" 400 "$workers" 100 ${GPU_FOLLOWUP_TESTS:---ignore=tests/test_special_values.py tests/}
fi
cache_summary
stamp "done"
return "$tests_rc"
}

main 2>&1 | tee -a "$out/gpu_followup.log"
exit "${PIPESTATUS[0]}"
