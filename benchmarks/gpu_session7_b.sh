#!/usr/bin/env bash
# Next device call B (prepared in session 6; one GPU): issue 4. The LoRA GPU tests (the triton_epilogue backend, the
# recompute_inputs equality test), benchmarks/lora_kernel.py per shape with the triton_epilogue backend, then the
# llama-1b step benchmark with the recompute_inputs and triton_epilogue variants. Results are appended to $OUT/RESULTS.md.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== LoRA GPU tests"
timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_lora_kernel.py tests/kernels/test_apply.py \
  > "$OUT/lora_tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|^E |FAILED" "$OUT/lora_tests.log" | tail -8
echo "== LoRA kernel benchmark"
timeout 140 python benchmarks/lora_kernel.py --results "$OUT/RESULTS.md" 2>&1 | cut -c1-200 | tail -25
echo "== LoRA step benchmark"
timeout 290 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -vE "Warning|warn" | cut -c1-200 | tail -12
