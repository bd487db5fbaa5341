#!/usr/bin/env bash
# Device call E (nvidia-h100-x2), session 6: DropBP and dense weak scaling with lit_ddp (issue 8), then a kernel
# profile of the LoRA step against the frozen floor (issue 4, to aim the next optimisation).
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== scaling with lit_ddp"
timeout 170 python benchmarks/scaling.py --gpus 1 2 --strategy lit_ddp --variants dropbp dense --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED|Error" | cut -c1-200
echo "== LoRA profile"
timeout 150 python benchmarks/profile_lora.py --top 22 > "$OUT/profile_lora.log" 2>&1
echo "profile exit $?"; cat "$OUT/profile_lora.log" | cut -c1-170 | tail -80
