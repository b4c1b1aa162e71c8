#!/usr/bin/env bash
# One device call: install crl-fast, run the GPU tests, run every benchmark, copy results to $OUT.
#
# The GPU machine has torch, triton and numpy but no gymnasium and no network. Before the call,
# here:   echo /.whl/ >> .git/info/exclude   (already ignored by .gitignore)
#         python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#           --implementation cp --platform manylinux2014_x86_64 --platform any \
#           -d .whl gymnasium farama-notifications
# then run this with carry [".whl"]:   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/crl-fast-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index . 2>&1 | tail -2
LOG="$OUT/log.txt"  # one log: $OUT returns at most 8 files (the rest are result JSONs)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"
step() { echo "=== $1"; shift; timeout "$@"; echo "=== exit $?"; }
step "gpu tests" 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee -a "$LOG"
step "loss bench" 300 python3 -m bench.bench_loss 2>&1 | tee -a "$LOG"
step "loss bench, autotuned tiles" 150 python3 -m bench.bench_loss --quick --autotune 2>&1 | tee -a "$LOG"
for b in buffer envs update; do
    if [ -f "bench/bench_$b.py" ]; then
        step "$b bench" 120 python3 -m "bench.bench_$b" 2>&1 | tee -a "$LOG"
    fi
done
cp bench/results/*.json "$OUT/" 2>/dev/null
ls "$OUT"
