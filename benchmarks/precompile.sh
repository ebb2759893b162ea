#!/usr/bin/env bash
# Triton's cache for the GPU run, built on a machine without a GPU (docs/development.md, "Carrying Triton's cache to
# the GPU run"): `bash benchmarks/precompile.sh` compiles gpu_perf_check.sh's kernels for sm_90 into .triton-cache/
# and packs what the GPU loads into .triton-cache.tgz, which the run carries. Arguments go to precompile.py:
#   bash benchmarks/precompile.sh --script perf --script check --script launch    # the three GPU scripts' kernels
# It runs under the GPU machine's Python, torch and Triton (3.12, 2.11.0, 3.6.0: a kernel's cache key holds the
# Triton wheel, one per Python version), in the venv PRECOMPILE_VENV (default .venv-gpu), made here on first use:
# PyPI's torch 2.11.0 with its CUDA libraries, about 5 GB, a few minutes (Python 3.12: PRECOMPILE_PYTHON, python3.12
# or pyenv's). Run it on the tree the GPU run gets.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PRECOMPILE_VENV:-.venv-gpu}
if [ ! -x "$venv/bin/python" ]; then
    python=""
    for candidate in ${PRECOMPILE_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
    [ -n "$python" ] || { echo "precompile.sh: no Python 3.12 (the GPU machine's): set PRECOMPILE_PYTHON"; exit 2; }
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet "torch==2.11.0" "triton==3.6.0" numpy
    "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e .
fi
"$venv/bin/python" benchmarks/precompile.py --fresh --pack .triton-cache.tgz "$@"
