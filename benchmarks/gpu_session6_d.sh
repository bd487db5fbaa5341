#!/usr/bin/env bash
# Device call D (nvidia-h100-x2), session 6: (1) the Sheared-LLaMA recipe end to end on one GPU at llama-1b ->
# llama-1b-half, a 100-step smoke run of each training stage (issue 7); (2) DDP settings for the 2-GPU scaling of
# dense llama-125m (issue 8). Logs and RESULTS.md in $OUT.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== recipe: prune -> export -> continue -> export, llama-1b -> llama-1b-half, 1 GPU"
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 SOURCE=llama-1b LIT_ACCEL="python -m lit_accel.cli" \
  PRUNE_ARGS="--config benchmarks/prune-1b-smoke.yaml" CONTINUE_ARGS="--config benchmarks/continue-1b-smoke.yaml" \
  timeout 300 bash recipes/prune_continue/run.sh > "$OUT/recipe.log" 2>&1
echo "recipe exit $? after $(( $(date +%s) - start )) s"
grep -E "^\[|Error|error:|lit_accel:|val/loss|step_time|pruned model|continued model" "$OUT/recipe.log" | cut -c1-250 | tail -40
ls -la runs/prune_continue/ runs/prune_continue/pruned runs/prune_continue/final 2>&1 | head -40
python - <<'PY' 2>&1 | tail -5
import json, os
for d in ("runs/prune_continue/pruned", "runs/prune_continue/final"):
    p = os.path.join(d, "config.json")
    if os.path.exists(p):
        c = json.load(open(p)); print(d, {k: c.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")})
PY
echo "== scaling: dense, DDP settings"
timeout 100 python benchmarks/scaling.py --gpus 1 2 --variants dense --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED" | cut -c1-200
timeout 60 python benchmarks/scaling.py --gpus 2 --variants dense --ddp gradient_as_bucket_view=true bucket_cap_mb=100 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED" | cut -c1-200
timeout 60 python benchmarks/scaling.py --gpus 2 --variants dense --ddp comm_hook=bf16 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED" | cut -c1-200
