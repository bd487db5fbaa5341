#!/usr/bin/env bash
# Next device call C (prepared in session 6; one GPU): issue 5. The cuSPARSELt plan cache (GPU tests, per-call
# times against torch's per-call plan and dense), then the quality figure: validation loss of 2:4 MLPs against dense
# after the same 600 steps at llama-125m (masked kernel: the same numbers as the cuSPARSELt path).
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== cuSPARSELt plan cache: GPU tests, then per-call times"
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_cusparselt.py > "$OUT/cusparselt_tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|^E |FAILED|Warn" "$OUT/cusparselt_tests.log" | tail -8
timeout 120 python benchmarks/cusparselt_plans.py --results "$OUT/RESULTS.md" 2>&1 | cut -c1-200 | tail -12
echo "== 2:4 quality, llama-125m"
timeout 330 python benchmarks/sparse24_quality.py --accelerator gpu --preset llama-125m --layers 12 --vocab 32000 \
  --seq 1024 --batch 16 --steps 600 --lr 6e-4 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error|^\|" | cut -c1-200
# With the plan cache measured faster: LIT_ACCEL_CUSPARSELT_PLANS=1 python benchmarks/gpu_sparse24_probe.py --results "$OUT/RESULTS.md"
# gives the layer and step ratios the goals are stated in (about 5 min; a call of its own).
