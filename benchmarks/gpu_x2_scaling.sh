#!/usr/bin/env bash
# Device call on nvidia-h100-x2 (issue 8): the two-GPU ZeRO-1/2/3 vs DDP test, then weak scaling 1 -> 2 GPUs of
# every technique under DDP. Results are appended to $OUT/RESULTS.md; logs in $OUT.
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== two-GPU test"
timeout 170 python -m pytest -q -p no:cacheprovider --tb=short \
  tests/strategies/test_deepspeed_gpu.py::test_zero_1_2_3_match_ddp_and_resume_on_two_gpus > "$OUT/two_gpu_test.log" 2>&1
echo "test exit $?"; grep -E "passed|failed|^E |FAILED" "$OUT/two_gpu_test.log" | tail -12
echo "== scaling 1 -> 2 GPUs, ddp"
timeout 390 python benchmarks/scaling.py --gpus 1 2 --results "$OUT/RESULTS.md" > "$OUT/scaling.log" 2>&1
echo "scaling exit $?"; grep -E "^\[|FAILED|Error" "$OUT/scaling.log" | cut -c1-200
