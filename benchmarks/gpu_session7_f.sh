#!/usr/bin/env bash
# Device call F (session 7; one GPU): after the review fixes to the cuSPARSELt binding (library version read from the
# loaded library, CONFIG_MAX_ID treated as exclusive, the id query off with the cache), the 2:4 + plan-cache GPU tests
# and the per-call plan timings again.
set -uo pipefail
source benchmarks/gpu_prelude.sh
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/sparsity tests/kernels/test_cusparselt.py \
  > "$OUT/gpu_sparse24.log" 2>&1
echo "2:4 gpu tests exit $?"; grep -E "passed|failed|^E |FAILED" "$OUT/gpu_sparse24.log" | cut -c1-220 | tail -6
python - <<'PY'
import torch
from lit_accel.ops import cusparselt as c
print("unavailable:", c.plan_cache_unavailable_reason(), "loaded version:", c._loaded_version(),
      "max ids:", [c.max_alg_id(m, k, 16384, torch.bfloat16, torch.device("cuda")) for m, k in ((5632, 2048), (2048, 5632), (2048, 2048))])
PY
timeout 120 python benchmarks/cusparselt_plans.py --results "$OUT/RESULTS.md" 2>&1 | grep "^|" | cut -c1-200 | tail -10
