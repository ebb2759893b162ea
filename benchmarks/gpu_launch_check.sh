#!/usr/bin/env bash
# The launch path's figures in one run on a machine with a GPU: `bash benchmarks/gpu_launch_check.sh` (it stops itself
# at GPU_CHECK_SECONDS, default 570 s: a 10-minute limit with time to pack up). Each figure, measured in this one run
# on this one card:
#   1. install manualbp (editable, no network); Triton's cache from .triton-cache.tgz where the run carried one
#      (benchmarks/precompile.py --script launch);
#   2. side by side: the CUDA-graph and reduce-overhead tests and the compile tests on the GPU (tests/test_launch.py,
#      tests/test_compile.py; one fixed tile, MANUALBP_AUTOTUNE=0), and the caches the timings need warmed
#      (warm_caches.py: every autotune config of the problem's launches, and Inductor's graphs) on the CPUs;
#   3. host_breakdown.py at linear8192x1024x4096 relu, bf16: a warm launch through its plan against an empty Triton
#      launch with 8 tensor arguments (target: at most 2x), and the experiments of issue 24's item 1 (the plan's
#      parts: the warm calls' lookups alone, addresses alone, JITFunction.run, the compiled launcher given tensors against
#      the same given data_ptr() ints, fixed arguments; the empty 8-tensor kernel launched directly);
#   4. profile_step.py at linear8192x1024x4096, relu and gelu: manualbp's forward+backward host time against
#      eager's (nn.Linear + the activation) in the same process (target: at most eager's);
#   5. bench_overhead.py, the triton backend, tiny Linear and MLP, forward+backward (target: at most 1.2x nn);
#   6. bench_dense.py at linear8192x1024x4096 relu and gelu, bf16, fwd+bwd: eager, eager compiled (default and
#      reduce-overhead), manualbp, manualbp compiled (default and reduce-overhead);
#   7. a summary of the figures against their targets, read from the logs above.
# Files in $OUT: gpu_launch_check.log (all of stdout), gpu_launch_tests.log, gpu_failures.log,
# bench_dense_<GPU>_launch.csv, bench_overhead_<GPU>_launch.csv, warm_launch.log.
DEFAULT_SECONDS=570
source "$(dirname "$0")/gpu_common.sh"
problem=linear8192x1024x4096

main() {
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
install_manualbp || return 1
gpu=$($py -c "import torch; print(''.join(c if c.isalnum() else '_' for c in torch.cuda.get_device_name()).strip('_')[:40])")

# --- 2. tests and cache warming, side by side --------------------------------------------------------------
stamp "tests + cache warming"
warm_workers=9  # the most configs any launch keeps (matmul_configs(), pruned)
(
    for i in $(seq 0 $((warm_workers - 1))); do
        $py benchmarks/warm_caches.py --worker "$i" --workers $warm_workers --problems "$problem" \
            --activations relu,gelu &
    done
    # Inductor's graphs, two processes; the manualbp ones with one fixed tile (the workers above tune)
    $py benchmarks/warm_caches.py --compile --compile-impls compile,compile-ro --worker 0 --workers 1 \
        --problems "$problem" --activations relu,gelu &
    MANUALBP_AUTOTUNE=0 $py benchmarks/warm_caches.py --compile --compile-impls manualbp-compile,manualbp-compile-ro \
        --worker 0 --workers 1 --problems "$problem" --activations relu,gelu &
    wait
) > "$out/warm_launch.log" 2>&1 &
warm_pid=$!
run_tests "$out/gpu_launch_tests.log" 150 4 120 tests/test_launch.py tests/test_compile.py
tests_rc=$?
timeout "$(budget 60)" tail --pid=$warm_pid -f /dev/null  # the warmers must not run beside the timings
kill $warm_pid 2>/dev/null; pkill -f warm_caches.py 2>/dev/null
grep -E "^warm" "$out/warm_launch.log" | tail -20

# --- 3. a warm launch against an empty one -------------------------------------------------------------------
stamp "host breakdown"
timeout "$(budget 60)" $py benchmarks/host_breakdown.py --problem "$problem" --activation relu 2>&1 \
    | grep -v "^ *\[W\|USDT"

# --- 4. host time of a step against eager's -------------------------------------------------------------------
for act in relu gelu; do
    stamp "profile_step $act"
    timeout "$(budget 50)" $py benchmarks/profile_step.py --problem "$problem" --activation $act \
        --impls eager,manualbp --rows 8 $( [ $act = gelu ] && echo --no-kernels ) 2>&1 | grep -v "^ *\[W\|USDT"
done

# --- 5. tiny layers: call overhead against nn -----------------------------------------------------------------
stamp "bench_overhead"
timeout "$(budget 40)" $py benchmarks/bench_overhead.py --problems linear,mlp --modes fwd+bwd --rounds 300 \
    --out-dir "$out" --tag "${gpu}_launch" 2>&1 | grep -v "^#   "

# --- 6. the compiled and reduce-overhead rows --------------------------------------------------------------
stamp "bench_dense"
timeout "$(budget 150)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd --problems "$problem" \
    --activations relu,gelu --impls eager,compile,compile-ro,manualbp,manualbp-compile,manualbp-compile-ro \
    --out-dir "$out" --tag "${gpu}_launch" 2>&1 | grep -v "^#   MiB"
echo "bench_dense: exit ${PIPESTATUS[0]}"

# --- 7. the figures against their targets ----------------------------------------------------------------
stamp "summary"
$py - "$out/gpu_launch_check.log" "$out/gpu_launch_tests.log" <<'EOF'
import re, sys
log, tests = (open(path, errors="replace").read() for path in sys.argv[1:3])
print("== issue 24, Done when (this run; a figure not found was not measured) ==")
m = re.search(r"# a warm launch: ([\d.]+) µs, ([\d.]+)x an empty 8-tensor launch", log)
print(f"host_breakdown: warm launch {m.group(1)} µs = {m.group(2)}x the empty 8-tensor launch (target <= 2x)"
      if m else "host_breakdown: not measured")
for act, block in re.findall(r"=== profile_step (\w+) at .*?\n(.*?)(?====|\Z)", log, re.S):
    host = dict(re.findall(r"## (\w+): host ([\d.]+) ms/call", block))
    if {"eager", "manualbp"} <= set(host):
        print(f"profile_step {act}: manualbp host {host['manualbp']} ms against eager's {host['eager']} ms "
              f"(target <= eager's: {'met' if float(host['manualbp']) <= float(host['eager']) else 'MISSED'})")
    else:
        print(f"profile_step {act}: not measured")
for name in ("test_cuda_graph_replays_eager_results", "test_reduce_overhead_matches_eager"):
    found = re.findall(rf"{name}\S* (PASSED|FAILED|SKIPPED|ERROR)", tests)
    print(f"{name}: {found[0] if found else 'not run'}")
print("bench_overhead and bench_dense: their tables above (ratios against nn and eager per row)")
EOF
cache_summary
stamp "done"
return "$tests_rc"
}

main 2>&1 | tee -a "$out/gpu_launch_check.log"
exit "${PIPESTATUS[0]}"
