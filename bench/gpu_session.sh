#!/usr/bin/env bash
# One GPU-machine session in one command: versions, the CUDA test suite on the
# real GPU, then the GPU benchmarks against PyTorch CUDA. Logs, JUnit XML and
# the pytest-benchmark JSON land in $OUT (or /tmp/kdnumba-gpu).
#
#     bash bench/gpu_session.sh            # from the repository root
#
# Uses the machine's own numba / numba-cuda / torch; kdnumba from the
# working tree (PYTHONPATH), so nothing is installed.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kdnumba-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_CACHE_DIR=/tmp/kdnumba-numba-cache
export KDNUMBA_CUDA_TESTS=1
PY=${PYTHON:-python3}

# Wheels carried in .whl/ (e.g. NumPy 2.4: numba-cuda 0.30.4 still registers
# np.row_stack, which NumPy 2.5 removed, so every CUDA compile fails there)
# take precedence over the machine's own packages.
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kdnumba-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/kdnumba-site:$PYTHONPATH"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm --format=csv \
    | tee "$OUT/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/machine.txt"
$PY - <<'PYEOF' 2>&1 | tee -a "$OUT/machine.txt"
import sys, numpy, numba
print(sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__)
try:
    import numba_cuda
    print("numba-cuda", numba_cuda.__version__)
except Exception as exc:
    print("numba-cuda not importable:", exc)
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
from kdnumba import _dispatch
print("kdnumba CUDA:", _dispatch.cuda_unavailable_reason() or "usable")
PYEOF

echo "== CUDA tests on the GPU"
t0=$(date +%s)
timeout "${KD_TEST_TIMEOUT:-330}" $PY -m pytest tests/cuda -q -n "${KD_WORKERS:-8}" -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 40
echo "tests took $(( $(date +%s) - t0 )) s"

echo "== GPU benchmarks"
t0=$(date +%s)
timeout "${KD_BENCH_TIMEOUT:-240}" $PY -m pytest bench/test_bench_cuda.py -q -p no:cacheprovider \
    --benchmark-enable --benchmark-json="$OUT/bench_cuda.json" \
    --benchmark-columns=min,median,max,rounds --benchmark-group-by=group 2>&1 \
    | tee "$OUT/bench_cuda.log" | tail -n 70
echo "bench took $(( $(date +%s) - t0 )) s"

# The host's CPU (a 16-core Xeon on the lent H200 machine): the headline CPU
# cases with the host's own target and with AVX-512 off (NUMBA_CPU_NAME=haswell),
# the "no regression on AVX-512" check of issue 16 that a 2-core AVX2 VM cannot do.
if [ "${KD_CPU_BENCH:-1}" = "1" ]; then
    grep -o -m1 'avx512[a-z]*' /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$OUT/machine.txt"; echo
    for target in host haswell; do
        echo "== CPU benchmarks, target $target"
        if [ "$target" = host ]; then unset NUMBA_CPU_NAME; else export NUMBA_CPU_NAME=$target; fi
        NUMBA_CACHE_DIR=/tmp/kdnumba-numba-cache-$target timeout "${KD_CPU_TIMEOUT:-150}" \
            $PY -m kdnumba.cli bench --quick --no-compile --repeats 20 \
            --case kd_loss/B4096_C1000/float32 --case selectivity_loss/variance/B4096_N2048/float32 \
            --case nt_xent/B4096_D128/float32 --save "$OUT/cpu_bench_$target.json" 2>&1 \
            | tee "$OUT/cpu_bench_$target.log" | tail -n 14
    done
    unset NUMBA_CPU_NAME
fi
