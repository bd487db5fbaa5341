#!/usr/bin/env bash
# Next device call A (prepared in session 6; one GPU is enough): the Sheared-LLaMA recipe end to end at llama-1b ->
# llama-1b-half, 100-step smoke runs of both training stages (issue 7: the run session 6 could not finish: the
# recipe's 'gui' domain was missing on the GPU machine's Python, fixed since). Logs in $OUT.
set -uo pipefail
source benchmarks/gpu_prelude.sh
echo "== recipe: prune -> export -> continue -> export, llama-1b -> llama-1b-half"
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 SOURCE=llama-1b LIT_ACCEL="python -m lit_accel.cli" \
  PRUNE_ARGS="--config benchmarks/prune-1b-smoke.yaml" CONTINUE_ARGS="--config benchmarks/continue-1b-smoke.yaml" \
  timeout 420 bash recipes/prune_continue/run.sh > "$OUT/recipe.log" 2>&1
echo "recipe exit $? after $(( $(date +%s) - start )) s"
grep -E "^\[|Error|error:|lit_accel:|val/loss|step_time|pruned model|continued model" "$OUT/recipe.log" | cut -c1-250 | tail -40
du -sh runs/prune_continue/* 2>/dev/null
echo "== cuSPARSELt: library, header and torch ops (issue 5: a plan-caching binding needs the exact enums)"
python - > "$OUT/cusparselt_probe.txt" 2>&1 <<'PY'
import glob, os, sys, torch
print("torch", torch.__version__, "cusparselt", torch.backends.cusparselt.version())
print("ops:", sorted(n for n in dir(torch.ops.aten) if "cslt" in n))
roots = [os.path.dirname(torch.__file__), *sys.path]
hits = sorted({p for r in roots for p in glob.glob(os.path.join(r, "**", "*cusparseLt*"), recursive=True)})
print("files:", hits[:40])
for h in (p for p in hits if p.endswith(".h")):
    print("=" * 20, h)
    print(open(h).read())
PY
echo "probe exit $?"; head -5 "$OUT/cusparselt_probe.txt" | cut -c1-300; wc -c "$OUT/cusparselt_probe.txt"

