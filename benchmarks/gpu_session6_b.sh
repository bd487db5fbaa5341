#!/usr/bin/env bash
# Next device call B: LoRA vs PEFT vs floor with the kernels on (issue 4), the 2:4 probe with the final kernel=auto
# (issue 5), and the pruned-shape speed (issue 7). Results are appended to $OUT/RESULTS.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
echo "== lora"; timeout 150 python benchmarks/lora.py --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|Error" | cut -c1-300
echo "== pruning speed"; timeout 120 python benchmarks/pruning.py --results "$OUT/RESULTS.md" 2>&1 | grep -E "^llama|Error"
echo "== scaling, 1-GPU point"; timeout 200 python benchmarks/scaling.py --gpus 1 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^\[|FAILED" | cut -c1-200
echo "== sparse probe"; timeout 250 python benchmarks/gpu_sparse24_probe.py --results "$OUT/RESULTS.md" > "$OUT/probe.log" 2>&1
echo "probe exit $?"; tail -25 "$OUT/RESULTS.md"
