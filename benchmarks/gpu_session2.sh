#!/usr/bin/env bash
# Device call 2: DeepSpeed GPU tests (foundation + DropBP), the CausalLM-vs-raw-loop benchmark, DropBP speed and
# sequence-length benchmarks. Results are appended to $OUT/RESULTS.md.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== GPU tests"
timeout 200 python -m pytest -q -m gpu tests/test_gpu.py tests/dropbp/test_dropbp_gpu.py -p no:cacheprovider -x \
  --tb=long > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"; grep -E "passed|failed|Error" "$OUT/gpu_tests.log" | tail -8
echo "== train step"; timeout 200 python benchmarks/train_step.py --results "$OUT/RESULTS.md" 2>&1 | grep "^\[" 
echo "== dropbp speed"; timeout 200 python benchmarks/dropbp.py speed --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error|rates"
echo "== dropbp seqlen"; timeout 200 python benchmarks/dropbp.py seqlen --results "$OUT/RESULTS.md" 2>&1 | grep -E "GiB|Error"
cat "$OUT/RESULTS.md"
