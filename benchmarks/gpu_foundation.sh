#!/usr/bin/env bash
# One device call for the foundation: GPU tests, a 20-step DeepSpeed ZeRO-2 run of configs/llama-1b.yaml, export of
# its DeepSpeed checkpoint to a Hugging Face directory (loaded back and scored). Logs go to $OUT.
#   bash benchmarks/gpu_foundation.sh            (carry .whl; see ../shared/gpu/README.md)
set -uo pipefail
source benchmarks/gpu_prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'PY'
import torch, lightning, transformers, deepspeed, wandb; print("torch", torch.__version__, "lightning", lightning.__version__,
"transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "wandb", wandb.__version__)
PY
echo "== GPU tests"; timeout 240 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
echo "== llama-1b 20 steps, DeepSpeed ZeRO-2"
t0=$(date +%s)
timeout 300 python -m lit_accel.cli fit --config configs/llama-1b.yaml --config benchmarks/llama-1b-smoke.yaml \
  --trainer.enable_progress_bar false > "$OUT/llama1b_smoke.log" 2>&1; echo "fit exit $? in $(( $(date +%s) - t0 )) s"
grep -E "step [0-9]+:|Error|error|val/loss" "$OUT/llama1b_smoke.log" | tail -20
echo "== export the DeepSpeed checkpoint"
timeout 200 python -m lit_accel.cli export --ckpt runs/llama-1b-smoke/checkpoints/last.ckpt --out /tmp/exported-1b 2>&1 | tail -3
python - <<'PY' 2>&1 | tail -5
import torch, glob
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp/exported-1b", dtype=torch.bfloat16).cuda().eval()
tok = AutoTokenizer.from_pretrained("/tmp/exported-1b")
import json.decoder; text = open(json.decoder.__file__).read()
ids = torch.tensor([tok(text)["input_ids"][:1024]], device="cuda")
with torch.no_grad():
    print("exported llama-1b: params", sum(p.numel() for p in m.parameters()), "loss on json/decoder.py", float(m(ids, labels=ids).loss))
PY
ls -la runs/llama-1b-smoke/checkpoints | head; du -sh runs/llama-1b-smoke/wandb
