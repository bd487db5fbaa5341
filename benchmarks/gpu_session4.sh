#!/usr/bin/env bash
# Device call 4: GPU tests, CausalLM-vs-raw-loop benchmark (after removing the per-step progress-bar sync), and
# the DropBP quality run. Results are appended to $OUT/RESULTS.md.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== GPU tests"
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider --tb=short > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|^E " "$OUT/gpu_tests.log" | tail -8
echo "== train step"; timeout 180 python benchmarks/train_step.py --results "$OUT/RESULTS.md" 2>&1 | grep "^\["
echo "== dropbp quality"; timeout 330 python benchmarks/dropbp.py quality --results "$OUT/RESULTS.md" > "$OUT/quality.log" 2>&1
echo "quality exit $?"; grep -E "^dense|^DropBP|Error" "$OUT/quality.log" | cut -c1-400
tail -32 "$OUT/RESULTS.md"
