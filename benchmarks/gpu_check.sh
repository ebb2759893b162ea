#!/usr/bin/env bash
# The one command a session with a GPU runs (device tool); its timeouts add up to 9 min 10 s (220 + 70 + 170 + 45 + 45 s)
# of commands on an H100 (give the device call timeout_s=600):
#   1. install manualbp (editable, no network needed: the machine has torch and triton);
#   2. the whole test suite on the compiled Triton kernels (fp16/bf16 and TF32 included);
#   3. Triton's matmul against cuBLAS at 4096^3 (the ceiling; first-call tuning time);
#   4. the benchmark at the issue's shapes in bf16, forward+backward, against eager,
#      torch.compile and cuBLAS; CSV and PNG written to $OUT (or benchmarks/results);
#   5. the two fusions against what they replace: MLP backward fusion off (MANUALBP_MLP_FUSION=0),
#      δ formed in the matmuls' loads off (MANUALBP_DELTA_PROLOGUE=0).
# Usage (device tool):  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
$py -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }

# Tests: compiled kernels; one fixed tile instead of autotuning each of the hundreds of
# small test shapes (test_kernels.py checks every autotune config on its own); without the
# offline compile report's test (a CPU check, benchmarks/compile_report.py; not needed here);
# 8 workers so Triton's compiles run in parallel.
xdist=""
$py -c "import xdist" 2>/dev/null && xdist="-n 8"
start=$(date +%s)
MANUALBP_AUTOTUNE=0 timeout 220 $py -m pytest -q $xdist -p no:cacheprovider -m "not compile_report" 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
echo "tests: exit $tests_rc in $(( $(date +%s) - start )) s"

# The matmul ceiling: Triton vs cuBLAS at 4096^3 (first call = compile + autotune).
timeout 70 $py benchmarks/bench_matmul.py --size 4096 --dtypes bf16,fp32,fp32-tf32 2>&1 | tee "$out/bench_matmul.log"

# Benchmark: bf16 fwd+bwd at every target shape (autotuning on; first-call tuning is
# excluded from the timings by do_bench's warm-up).
start=$(date +%s)
timeout 170 $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd \
    --impls cublas,eager,compile,manualbp,manualbp-recompute --activations relu,gelu --out-dir "$out" \
    2>&1 | tee "$out/bench.log" | grep -v "^#" | tail -40
echo "bench: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"

# The MLP backward fusion against the per-layer path (MANUALBP_MLP_FUSION=0), same shapes.
MANUALBP_MLP_FUSION=0 timeout 45 $py benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd --impls manualbp \
    --problems mlp8192x1024x4096,mlp8192x4096x16384 --out-dir "$out" --tag mlp_fusion_off 2>&1 | grep -v "^#" | tail -4

# A single layer's δ formed in its two backward matmuls against a separate δ pass (MANUALBP_DELTA_PROLOGUE=0).
MANUALBP_DELTA_PROLOGUE=0 timeout 45 $py benchmarks/bench_dense.py --dtypes bf16 --modes bwd,fwd+bwd \
    --impls eager,manualbp --activations relu,gelu --problems linear8192x1024x4096,linear8192x4096x1024 \
    --out-dir "$out" --tag delta_prologue_off 2>&1 | grep -v "^#" | tail -12
exit "$tests_rc"
