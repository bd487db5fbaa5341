#!/usr/bin/env bash
# Device call 3: sync diagnostics of the CausalLM step, DropBP speed (with systematic sampling) and quality.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== syncs"; timeout 90 python benchmarks/find_syncs.py 2>&1 | tail -12
echo "== dropbp speed"; timeout 220 python benchmarks/dropbp.py speed --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error"
echo "== dropbp quality"; timeout 300 python benchmarks/dropbp.py quality --results "$OUT/RESULTS.md" > "$OUT/quality.log" 2>&1
echo "quality exit $?"; grep -E "^dense|^DropBP|Error|rates" "$OUT/quality.log" | cut -c1-600
tail -30 "$OUT/RESULTS.md"
