#!/usr/bin/env bash
# The prepared device check (one run on a lent H100/H200): the kernel tests with the compiled
# kernels (bf16 included), then the kernel bench with the 7B-shaped overhead and a profile.
# Output lands in $OUT (the device tool's return folder; /tmp/vlm_prune_gpu elsewhere).
#
# No network there and no pip build: the package is laid out by links (the package-dir
# mapping of pyproject.toml) in the device's throwaway copy of the tree, and a carried .whl/
# folder (transformers as pinned in constraints.txt; docs/kernels.md has the download command)
# is unpacked over the machine's own packages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/vlm_prune_gpu}"
SITE=/tmp/vlm_prune_site
mkdir -p "$OUT"
rm -rf "$SITE" && mkdir -p "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
fi
# the repo root is first on sys.path (python -m), so the mapped parts go into this copy's tree
for part in kernels patches evals; do [ -e "vlm_prune/$part" ] || ln -s "../$part" "vlm_prune/$part"; done
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers, vlm_prune; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| vlm_prune from', vlm_prune.__file__)"
} 2>&1 | tee "$OUT/env.txt"
# three shards at once: compiling the kernels is CPU work, and the device has cores to spare
# (KERNEL_TESTS=0: the bench only, for a rerun after host-side changes)
if [ "${KERNEL_TESTS:-1}" != 0 ]; then
  start=$(date +%s)
  shard() { local name=$1; shift; timeout 200 python3 -m pytest -q -p no:cacheprovider "$@" > "$OUT/kernel_tests_$name.txt" 2>&1; }
  shard a tests/test_kernels.py -k "(transition or compact_gather or topk) and not compiles and not end_to_end" &
  shard b tests/test_kernels.py -k "(cls_attention_row or attention_received or end_to_end or bench or straight or host_calls or cached_launch or launch_signature) and not compiles" &
  shard c tests/test_kernel_compaction.py &
  wait
  tail -n 4 "$OUT"/kernel_tests_*.txt
  echo "kernel tests: $(( $(date +%s) - start )) s"
fi
# --out: the run's numbers and tables with the harness's spread (kernels-<GPU>-<dtype>-<time>.json/.txt)
# come back with $OUT too; keepers go to benchmarks/results/kernels/ (docs/kernels.md cites them)
timeout 330 python3 -m vlm_prune.kernels.bench --repeats "${REPEATS:-50}" --json "$OUT/kernel_bench.json" \
  --out "$OUT" --profile "$OUT/profiles.txt" 2>&1 | tee "$OUT/kernel_bench.txt"
