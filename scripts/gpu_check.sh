#!/usr/bin/env bash
# The prepared device check (one run on a lent H100/H200): the kernel tests with the compiled
# kernels (bf16 included) and the kernel bench. Output lands in $OUT when the device tool sets it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vlm_prune_gpu}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
TRITON_INTERPRET=0 python3 -m pytest -q tests/test_kernels.py -m "not slow" 2>&1 | tee "$OUT/kernel_tests.txt"
python3 -m vlm_prune.kernels.bench --repeats 20 --json "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/kernel_bench.txt"
