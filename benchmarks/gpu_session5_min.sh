#!/usr/bin/env bash
# Minimal device call (session 5, little device time left): the integration's GPU tests and the 125M step, HF eager vs
# lit_accel kernels. Results are appended to $OUT/RESULTS.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
timeout 50 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_apply.py 2>&1 | tail -4
timeout 80 python benchmarks/hot_path.py --sizes llama-125m:16:2048 --variants eager ours --warmup 3 --iters 5 \
  --repeats 2 --results "$OUT/RESULTS.md" 2>&1 | grep -E "^llama|FAILED|Error|patched" | cut -c1-300
