#!/usr/bin/env bash
# Device call F (session 8; one GPU): the final state: the LoRA step against PEFT and the floor, the kernel table and
# the per-group table, then every `gpu` test in three groups.
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -v Warning | grep -v "CausalLM kernels" | tail -8
timeout 90 python benchmarks/lora_kernel.py --results "$OUT/RESULTS.md" 2>&1 | grep -v Warn | tail -3
timeout 60 python benchmarks/lora_group.py --results "$OUT/RESULTS.md" 2>&1 | tail -3
bash benchmarks/gpu_session7_e.sh
