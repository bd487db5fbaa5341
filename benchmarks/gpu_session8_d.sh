#!/usr/bin/env bash
# Device call D (session 8; one GPU): u and dB from one read of dY (dy_products): the tile sweep, the LoRA/kernel
# `gpu` tests, the training step against PEFT and the floor, the step profile.
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python benchmarks/lowrank_reduce_sweep.py 2>&1 | grep -v Warn | tail -45
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/lowrank tests/kernels/test_apply.py \
  tests/kernels/test_lora_kernel.py tests/kernels/test_lowrank_reduce.py > "$OUT/gpu_lora.log" 2>&1
echo "== lora tests: exit $?"
grep -E "passed|failed|^E |FAILED" "$OUT/gpu_lora.log" | cut -c1-220 | tail -12
timeout 200 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -v Warning | grep -v "CausalLM kernels" | tail -8
timeout 100 python benchmarks/profile_lora.py --top 30 2>&1 | grep -v Warn | cut -c1-150 | sed -n '/ours minus floor/,$p' | head -45
