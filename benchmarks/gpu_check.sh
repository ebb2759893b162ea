#!/usr/bin/env bash
# The one command to run on a machine with a GPU: `bash benchmarks/gpu_check.sh` (docs/development.md, "GPU checks").
# The launch path's figures (warm launch against an empty one, host time against eager's, tiny layers, the CUDA-graph
# and reduce-overhead tests, the compiled rows) have a run of their own: benchmarks/gpu_launch_check.sh.
# It stops itself at GPU_CHECK_SECONDS (default 575 s) after its start, each step cut to the time left:
#   1. install manualbp (editable, no network: the machine has torch and triton); Triton's cache from
#      .triton-cache.tgz where the run carried one (benchmarks/precompile.py --script check); then, <= 20 s, the
#      minimal reproducer of the excluded TMA tile (benchmarks/tma_tile_repro.py: right or wrong per variant, and
#      what follows from it: docs/kernels.md, "The excluded tile");
#   2. side by side on the machine's CPUs, timing nothing: the test suite on the compiled kernels but
#      test_special_values.py (gpu_followup.sh's; the GPU-specific files first: every autotune config, the packed
#      selects, the excluded TMA tile compiled), and benchmarks/warm_caches.py and bench_backward.py --warm-only
#      filling Triton's and Inductor's caches for the benchmarks below, one process per config or activation
#      (the autotuner compiles configs one after another, minutes at these shapes);
#   3. bench_backward.py: a layer's backward, kernels only (CUDA graphs), each way of forming δ against eager,
#      at the issue's (1024, 4096) shapes, then at in_features 2048 (where PROLOGUE_MAX_K's crossing may lie);
#   4. the TMA configs on (MANUALBP_TMA=1, and MANUALBP_WARP_SPECIALIZE=1 for the warp-specialized ones: opt-in
#      until a run like this one has checked their results; the table's
#      error column against float64) at the two host-bound shapes;
#   5. the benchmark at the issue's shapes in bf16, forward+backward, against eager and torch.compile,
#      the issue's targets first (CSV rows appended as measured, so a cut-short run keeps them); then Triton's
#      matmul against cuBLAS at 4096^3 (bf16, fp32, TF32);
#   6. with the time left: where a step's time goes (host_breakdown.py, now splitting the launches' ~175 µs each
#      into JITFunction.run's binding, the compiled launch, and that launch given addresses instead of
#      tensors (no cuPointerGetAttribute per pointer: docs/development.md's plan, step 2); profile_step.py, bench_overhead.py: measured
#      already), then the δ prologue and the MLP backward fusion off
#      (MANUALBP_DELTA_PROLOGUE=0, MANUALBP_MLP_FUSION=0).
# Files in $OUT (at most 8, the rest packed): gpu_check.log (all of stdout), gpu_tests.log,
# gpu_failures.log (each failure's traceback as it happened: MANUALBP_FAILURE_LOG, tests/conftest.py), warm.log,
# bench_backward_<GPU>.csv, bench_dense_<GPU>.csv and .png, extra_runs.tgz (the CSVs and plots of steps 3, 4,
# bench_matmul's of 5, and 6).
DEFAULT_SECONDS=575
source "$(dirname "$0")/gpu_common.sh"

main() {

start_run || return 1

extra=$(mktemp -d)  # CSVs and plots that come back packed in extra_runs.tgz ($OUT holds 8 files)

# --- 1b. the excluded TMA tile in a minimal kernel, Triton alone (before anything else loads the GPU) --------
stamp "TMA tile reproducer"
timeout "$(capped 20)" $py benchmarks/tma_tile_repro.py --repeats 3

# --- 2. tests and cache warming, side by side -----------------------------------------------------------
stamp "tests + cache warming"
problems=linear8192x1024x4096,mlp8192x1024x4096,linear8192x4096x1024,linear8192x4096x16384,linear8192x16384x4096,mlp8192x4096x16384
warm_workers=11  # the most configs any launch keeps (matmul_configs(), pruned, TMA on)
(
    for i in $(seq 0 $((warm_workers - 1))); do
        $py benchmarks/warm_caches.py --worker "$i" --workers $warm_workers --problems "$problems" \
            --matmul-dtypes fp32,fp32-tf32 &
    done
    for i in 0 1 2; do $py benchmarks/warm_caches.py --compile --worker "$i" --workers 3 --problems "$problems" & done
    wait
    # The launches that only step 5 makes.
    for i in $(seq 0 $((warm_workers - 1))); do
        MANUALBP_DELTA_PROLOGUE=0 $py benchmarks/warm_caches.py --worker "$i" --workers $warm_workers \
            --problems linear8192x1024x4096,linear8192x4096x1024 &
        MANUALBP_MLP_FUSION=0 $py benchmarks/warm_caches.py --worker "$i" --workers $warm_workers \
            --problems mlp8192x1024x4096 &
        MANUALBP_TMA=1 MANUALBP_WARP_SPECIALIZE=1 $py benchmarks/warm_caches.py --worker "$i" --workers $warm_workers \
            --problems linear8192x1024x4096,linear8192x4096x1024 &
    done
    wait
) > "$out/warm.log" 2>&1 &
warm_pid=$!
# bench_backward.py's ways (step 3), one process per activation: each compiles its own kernel variants.
warm_backward=$(mktemp)
for act in relu gelu leaky_relu tanh; do
    $py benchmarks/bench_backward.py --warm-only --activations $act \
        --problems linear8192x1024x4096,linear8192x4096x1024,linear8192x2048x4096 >> "$warm_backward" 2>&1 &
done

# Without test_special_values.py: its ~2000 cases, each compiling kernel variants on a bare machine, took most of
# this step's time on the H200 (half the suite run in 260 s, 2026-12-04); benchmarks/gpu_followup.sh runs them.
# MANUALBP_CHECK_EXCLUDED_TILE=1: the TMA tile excluded from δ-in-the-loads launches (wrong on the H200, Triton 3.6,
# 2026-12-04) runs compiled in test_kernels, on the role kernels (docs/kernels.md): whether it is still wrong.
MANUALBP_CHECK_EXCLUDED_TILE=1 run_tests "$out/gpu_tests.log" 200 8 150 --ignore=tests/test_special_values.py tests/test_kernels.py \
    tests/test_linear.py tests/test_mlp.py tests/test_autocast.py tests/test_compile.py tests/
tests_rc=$?
# The warmers should be done by now; they must not run beside the timings.
timeout "$(capped 30)" tail --pid=$warm_pid -f /dev/null
kill $warm_pid 2>/dev/null; pkill -f warm_caches.py 2>/dev/null; pkill -f "bench_backward.py --warm-only" 2>/dev/null
grep -E "^warm" "$out/warm.log" | tail -40
tail -5 "$warm_backward"

# --- 3. the backward's ways of forming δ, kernels only (CUDA graphs: no host time) ---------------------------
stamp "bench_backward"
timeout "$(capped 90)" $py benchmarks/bench_backward.py --out-dir "$extra" 2>&1 | grep -v "^#   MiB"
# in_features 2048: between the K where δ in the loads won (1024) and lost (4096): dense.PROLOGUE_MAX_K
timeout "$(capped 40)" $py benchmarks/bench_backward.py --out-dir "$extra" --problems linear8192x2048x4096 \
    --activations relu,gelu 2>&1 | grep -v "^#"
cp "$extra"/bench_backward_*.csv "$out"/ 2>/dev/null  # its plot stays in extra_runs.tgz

# --- 4. the TMA configs on (opt-in until a run like this checks them: the table's error column), the
# warp-specialized ones among them where this Triton has them (dense.WARP_SPECIALIZE_AVAILABLE) --------------------
stamp "TMA configs on"
MANUALBP_TMA=1 MANUALBP_WARP_SPECIALIZE=1 timeout "$(capped 40)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls eager,manualbp --activations relu,gelu --problems linear8192x1024x4096,linear8192x4096x1024 \
    --out-dir "$extra" --tag "${gpu}_tma_on" 2>&1 | grep -v "^#"

# --- 5. the benchmark -------------------------------------------------------------------------------------
stamp "bench_dense"
timeout "$(capped 130)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls eager,compile,manualbp,manualbp-recompute --activations relu,gelu --problems "$problems" \
    --out-dir "$out" 2>&1 | grep -v "^#   MiB"
echo "bench_dense: exit ${PIPESTATUS[0]}"

stamp "bench_matmul"
timeout "$(capped 60)" $py benchmarks/bench_matmul.py --size 4096 --dtypes bf16,fp32,fp32-tf32 --out-dir "$extra" \
    | grep -v "^#   "  # the layer's products too: gpu_perf_check.sh
# --- 6. with the time left: where a step's time goes (host against device, each kernel), the fusions off ----
stamp "host breakdown"
timeout "$(capped 35)" $py benchmarks/host_breakdown.py --problem linear8192x1024x4096 --activation relu 2>&1 \
    | grep -v "^ *\[W\|USDT"
stamp "profile"
timeout "$(capped 40)" $py benchmarks/profile_step.py --problem linear8192x1024x4096 --activation relu \
    --impls eager,manualbp --rows 8 2>&1 | grep -v "^ *\[W\|USDT"
stamp "bench_overhead"
timeout "$(capped 20)" $py benchmarks/bench_overhead.py --rounds 300 --out-dir "$extra" 2>&1 | grep -v "^#   "

stamp "delta prologue off"
MANUALBP_DELTA_PROLOGUE=0 timeout "$(capped 40)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls eager,manualbp --activations relu,gelu --problems linear8192x1024x4096,linear8192x4096x1024 \
    --out-dir "$extra" --tag "${gpu}_delta_prologue_off" 2>&1 | grep -v "^#"
stamp "MLP fusion off"
MANUALBP_MLP_FUSION=0 timeout "$(capped 25)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls eager,manualbp --problems mlp8192x1024x4096 --out-dir "$extra" --tag "${gpu}_mlp_fusion_off" 2>&1 \
    | grep -v "^#"
tar czf "$out/extra_runs.tgz" -C "$extra" . 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
cache_summary
stamp "done"
return "$tests_rc"
}

main 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
