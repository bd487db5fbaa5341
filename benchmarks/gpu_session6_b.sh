#!/usr/bin/env bash
# Next device call B: LoRA vs PEFT vs floor with the kernels on (issue 4), the pruned-shape speed (issue 7) and the
# 1-GPU scaling point of every technique (issue 8). Results are appended to $OUT/RESULTS.md.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== lora"; timeout 150 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error" | cut -c1-300
echo "== pruning speed"; timeout 120 python benchmarks/pruning.py --results "$OUT/RESULTS.md" 2>&1 | grep -E "^llama|Error"
echo "== scaling, 1-GPU point"; timeout 200 python benchmarks/scaling.py --gpus 1 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED" | cut -c1-200
tail -30 "$OUT/RESULTS.md"
