#!/usr/bin/env bash
# Device call E (session 8; one GPU): the fused LoRA SwiGLU MLP (lora_mlp, since removed: slower) : the LoRA/kernel
# `gpu` tests, the training step against PEFT and the floor (more steps), the step profile.
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/lowrank tests/kernels/test_apply.py \
  tests/kernels/test_lora_kernel.py tests/kernels/test_lowrank_reduce.py > "$OUT/gpu_lora.log" 2>&1
echo "== lora tests: exit $?"
grep -E "passed|failed|^E |FAILED" "$OUT/gpu_lora.log" | cut -c1-220 | tail -12
timeout 300 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -v Warning | grep -v "CausalLM kernels" | tail -8
timeout 100 python benchmarks/profile_lora.py --top 30 2>&1 | grep -v Warn | cut -c1-150 | sed -n '/ours minus floor/,$p' | head -45
