#!/usr/bin/env bash
# Device call E (session 7; one GPU): the `gpu` tests again after call D hung in an fp16 cuSPARSELt case (the path is
# bf16 only now), in three groups with their own time limits so that one hang cannot eat the call: 2:4 (incl.
# DeepSpeed ZeRO-1/2/3) and the plan cache; LoRA (recompute_inputs on by default) and the kernel patches; the rest.
set -uo pipefail
source benchmarks/gpu_prelude.sh
group() {  # name, seconds, test paths...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" python -m pytest -q -p no:cacheprovider -m gpu "$@" > "$OUT/gpu_$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - start )) s"
  grep -E "passed|failed|^E |FAILED" "$OUT/gpu_$name.log" | cut -c1-220 | tail -6
}
group sparse24 200 tests/sparsity tests/kernels/test_cusparselt.py
group lora 170 tests/lowrank tests/kernels/test_apply.py tests/kernels/test_lora_kernel.py
group rest 170 tests --ignore=tests/sparsity --ignore=tests/lowrank \
  --ignore=tests/kernels/test_apply.py --ignore=tests/kernels/test_lora_kernel.py --ignore=tests/kernels/test_cusparselt.py
