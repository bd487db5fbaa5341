#!/usr/bin/env bash
# Device call A (session 8; one GPU): shared-input LoRA groups vs per-layer at llama-1b shapes, then the `gpu` tests
# again on main as left by session 7's review (GPU-side edits not yet run on a GPU).
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python benchmarks/lora_group.py --results "$OUT/RESULTS.md" 2>&1 | tail -30
bash benchmarks/gpu_session7_e.sh
