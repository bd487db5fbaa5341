#!/usr/bin/env bash
# Device call B (session 8; one GPU): LoRA with shared-input groups and the low-rank-first cuBLAS order: the LoRA and
# kernel-patch `gpu` tests, then the training step against PEFT and the floor, then the per-group table.
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/lowrank tests/kernels/test_apply.py \
  tests/kernels/test_lora_kernel.py > "$OUT/gpu_lora.log" 2>&1; echo "== lora tests: exit $?"
grep -E "passed|failed|^E |FAILED" "$OUT/gpu_lora.log" | cut -c1-220 | tail -8
timeout 240 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -v Warning | tail -8
timeout 100 python benchmarks/lora_group.py --results "$OUT/RESULTS.md" 2>&1 | tail -18
