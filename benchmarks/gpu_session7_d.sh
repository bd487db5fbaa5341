#!/usr/bin/env bash
# Device call D (session 7; one GPU): every `gpu` test with the new defaults (cuSPARSELt plan cache on,
# SemiStructuredSparsity kernel="auto", LoRA recompute_inputs=True, 2:4 under DeepSpeed ZeRO-1/2/3), then the 2:4
# probe's verify part (bf16 at llama-1b shapes and the fp16 case whose algorithm sweep used to fault the context).
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== all gpu tests"
start=$(date +%s)
timeout 420 python -m pytest -q -p no:cacheprovider -m gpu -x --durations=8 tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed|^E |FAILED|^[0-9.]+s (call|setup)" "$OUT/gpu_tests.log" | cut -c1-220 | tail -20
echo "== 2:4 probe, verify part (plan cache on by default)"
timeout 120 python benchmarks/gpu_sparse24_probe.py --skip correct layers mlp step --results "$OUT/RESULTS.md" \
  > "$OUT/probe_verify.log" 2>&1
echo "probe exit $?"; grep -vE "Warning|warn" "$OUT/probe_verify.log" | grep -E "^\[|summary|verify:|fused AdamW" | cut -c1-220
