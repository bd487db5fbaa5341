#!/usr/bin/env bash
# Next device call C (prepared in session 6; one GPU): issue 5's quality figure, validation loss of 2:4 MLPs against
# dense after the same 600 steps at llama-125m (masked kernel: the same numbers as the cuSPARSELt path).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
echo "== 2:4 quality, llama-125m"
timeout 540 python benchmarks/sparse24_quality.py --accelerator gpu --preset llama-125m --layers 12 --vocab 32000 \
  --seq 1024 --batch 16 --steps 600 --lr 6e-4 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error|^\|" | cut -c1-200
