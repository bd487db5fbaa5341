#!/usr/bin/env bash
# Next device call A (prepared in session 5, whose device time ran out): every GPU test, then the hot-path step
# benchmark of issue 6. Results are appended to $OUT/RESULTS.md; logs in $OUT.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== GPU tests"
timeout 240 python -m pytest -q -m gpu tests -p no:cacheprovider --tb=short -x --durations=15 > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|^E |FAILED" "$OUT/gpu_tests.log" | tail -12
echo "== hot path step"
timeout 320 python benchmarks/hot_path.py --results "$OUT/RESULTS.md" > "$OUT/hot_path.log" 2>&1
echo "hot_path exit $?"; grep -E "^llama|FAILED" "$OUT/hot_path.log" | cut -c1-300
