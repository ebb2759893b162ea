#!/usr/bin/env bash
# The matmuls' and the fused layers' speed in one run on a machine with a GPU: `bash benchmarks/gpu_perf_check.sh`
# (docs/development.md, "Plan for the next GPU run"). It stops itself at GPU_CHECK_SECONDS (default 570 s: a 10-minute
# limit with time to pack up), each step cut to the time left (the limits below and the install add up to about 560 s):
#   1. install manualbp (editable, no network), about 15 s; Triton's cache from .triton-cache.tgz where the run
#      carried one (benchmarks/precompile.py builds it without a GPU: docs/development.md, "Carrying Triton's cache
#      to the GPU run"), and whether its keys can match here;
#   2. side by side on the machine's CPUs, timing nothing, at most 150 s: Triton's cache filled for every timed
#      launch (bench_matmul.py --warm-only and warm_caches.py, one process per autotune config; the first layers'
#      and the per-layer MLP's launches too; loaded, not compiled, where the carried cache has them) and Inductor's
#      for the torch.compile rows; then how many kernels were loaded from the cache and how many compiled;
#   3. bench_matmul.py, at most 90 s: Triton's plain matmul against cuBLAS at 4096^3 and a layer's three products
#      (X Wᵀ, δ W, δᵀ X) at (8192, 1024, 4096) and (8192, 4096, 1024), in bf16, float32 IEEE and TF32;
#   4. bench_dense.py at the (1024 -> 4096) and (4096 -> 1024) layers, relu and gelu, hidden and first, bf16,
#      forward+backward, eager, torch.compile and manualbp, each timed twice: kernels only (the step captured in a
#      CUDA graph and replayed) and with the host (do_bench), at most 130 s;
#   5. the same at the GPU-bound shapes and at in_features 2048 (PROLOGUE_MAX_K's crossing): the 16384-wide layers,
#      the two MLPs, linear8192x2048x{4096,1024}, hidden layers, and Llama-2 7B's gated MLP, at most 100 s;
#   6. the MLP's per-layer backward (MANUALBP_MLP_FUSION=0) at both MLPs, both timings, at most 35 s;
#   7. bench_backward.py at in_features 1024, 2048 and 4096: a first and a hidden layer's backward by each plan for δ
#      (in the loads, by a pass), kernels only, at most 40 s; last, the (2048 -> 1024) layer, whose ∂C/∂W the plan
#      splits in 2 (64 output tiles of 128x256 for 132 SMs): its "unsplit" rows time the same plan without split-K;
#   8. perf_targets.py: each target of the persistent-kernel work met, missed or not measured, from this run's rows;
#      the whole run's count of kernels loaded from Triton's cache and compiled.
# Rows are appended as measured: a step cut short keeps what it measured. Files in $OUT (at most 8, the rest
# packed): gpu_perf_check.log (all of stdout), warm_perf.log, bench_matmul_<GPU>.csv and .png,
# bench_dense_<GPU>.csv and .png (steps 4 and 5: the timing column says which), extra_perf.tgz (steps 6 and 7's
# CSVs and plots).
DEFAULT_SECONDS=570
source "$(dirname "$0")/gpu_common.sh"

main() {
start_run || return 1
extra=$(mktemp -d)  # CSVs and plots that come back packed in extra_perf.tgz
since=$(date -u +"%Y-%m-%d %H:%M UTC")  # the rows of this run: their date is this or later (perf_targets.py)

targets=linear8192x1024x4096,linear8192x4096x1024
bound=linear8192x4096x16384,linear8192x16384x4096,mlp8192x1024x4096,mlp8192x4096x16384
crossing=linear8192x2048x4096,linear8192x2048x1024
# Llama-2 7B's MLP: the gated layer (in_features 4096: δ_g, δ_u stored)
gated=gated8192x4096x11008
mlps=mlp8192x1024x4096,mlp8192x4096x16384

# --- 2. the caches, side by side -----------------------------------------------------------------------------
stamp "cache warming"
workers=9  # the most configs any launch keeps (matmul_configs(), pruned)
(
    # what steps 3 and 4 time first; the later steps' warmers at a lower priority on the same cores
    for i in $(seq 0 $((workers - 1))); do
        $py benchmarks/bench_matmul.py --warm-only --worker "$i" --workers $workers &
        $py benchmarks/warm_caches.py --worker "$i" --workers $workers --problems "$targets" --layers hidden,first &
        nice -n 10 $py benchmarks/warm_caches.py --worker "$i" --workers $workers --problems "$bound,$crossing,$gated" &
        MANUALBP_MLP_FUSION=0 nice -n 10 $py benchmarks/warm_caches.py --worker "$i" --workers $workers \
            --problems "$mlps" &
    done
    for i in 0 1 2; do
        $py benchmarks/warm_caches.py --compile --worker "$i" --workers 3 --problems "$targets" --layers hidden,first &
        nice -n 10 $py benchmarks/warm_caches.py --compile --worker "$i" --workers 3 --problems "$bound,$crossing,$gated" &
    done
    for act in relu gelu; do
        nice -n 10 $py benchmarks/bench_backward.py --warm-only --activations $act \
            --problems linear8192x1024x4096,linear8192x2048x4096,linear8192x4096x1024,linear8192x2048x1024 &
    done
    wait
) > "$out/warm_perf.log" 2>&1 &
warm_pid=$!
timeout "$(capped 150)" tail --pid=$warm_pid -f /dev/null
# The warmers must not run beside the timings: those still running are stopped (their processes, by id).
pkill -P $warm_pid 2>/dev/null; kill $warm_pid 2>/dev/null; wait $warm_pid 2>/dev/null
grep -E "^warm" "$out/warm_perf.log" | sort | uniq -c | sort -rn | head -20
grep -c "FAILED\|Error" "$out/warm_perf.log" | sed 's/^/warm: lines naming a failure: /'
cache_summary | head -1 | sed "s/^/after warming: /"

# --- 3. the matmul against cuBLAS ------------------------------------------------------------------------------
stamp "bench_matmul"
timeout "$(capped 90)" $py benchmarks/bench_matmul.py --out-dir "$out" 2>&1 | grep -v "^#   "
echo "bench_matmul: exit ${PIPESTATUS[0]}"

# --- 4. the layers of the targets, kernels only and with the host ----------------------------------------------
stamp "bench_dense: (1024, 4096) layers"
timeout "$(capped 130)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd --impls eager,compile,manualbp \
    --activations relu,gelu --problems "$targets" --layers hidden,first --timing graph,host --out-dir "$out" 2>&1 \
    | grep -v "^#   MiB"
echo "bench_dense: exit ${PIPESTATUS[0]}"

# --- 5. GPU-bound shapes and PROLOGUE_MAX_K's crossing -----------------------------------------------------------
stamp "bench_dense: GPU-bound shapes, in_features 2048, the gated MLP"
timeout "$(capped 100)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd --impls eager,compile,manualbp \
    --activations relu,gelu --problems "$crossing,$bound,$gated" --timing graph,host --out-dir "$out" 2>&1 \
    | grep -v "^#"
echo "bench_dense: exit ${PIPESTATUS[0]}"

# --- 6. the MLP's fused epilogue against its per-layer path ------------------------------------------------------
stamp "MLP fusion off"
MANUALBP_MLP_FUSION=0 timeout "$(capped 35)" $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls eager,manualbp --problems "$mlps" --timing graph,host --out-dir "$extra" --tag "${gpu}_mlp_fusion_off" \
    2>&1 | grep -v "^#"

# --- 7. the backward's plans for δ around PROLOGUE_MAX_K, kernels only -------------------------------------------
stamp "bench_backward"
timeout "$(capped 40)" $py benchmarks/bench_backward.py --out-dir "$extra" --activations relu,gelu \
    --problems linear8192x1024x4096,linear8192x2048x4096,linear8192x4096x1024,linear8192x2048x1024 2>&1 \
    | grep -v "^#   "

# --- 8. the targets, read from this run's rows --------------------------------------------------------------------
stamp "targets"
$py benchmarks/perf_targets.py --since "$since" --matmul "$out/bench_matmul_$gpu.csv" --dense "$out/bench_dense_$gpu.csv"
tar czf "$out/extra_perf.tgz" -C "$extra" . 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader
cache_summary
stamp "done"
}

main 2>&1 | tee -a "$out/gpu_perf_check.log"
exit "${PIPESTATUS[0]}"
