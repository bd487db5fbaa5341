#!/usr/bin/env bash
# Next device call C: the 2:4 probe with the final kernel=auto decision (issue 5). Results are appended to $OUT/RESULTS.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
echo "== sparse probe"; timeout 280 python benchmarks/gpu_sparse24_probe.py --results "$OUT/RESULTS.md" > "$OUT/probe.log" 2>&1
echo "probe exit $?"; tail -40 "$OUT/RESULTS.md"
