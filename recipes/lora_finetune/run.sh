#!/usr/bin/env bash
# LoRA fine-tuning recipe: fit adapters on a text folder, then export the merged model.
#   recipes/lora_finetune/run.sh MODEL_DIR TEXT_FOLDER [extra lit-accel fit arguments...]
# e.g. recipes/lora_finetune/run.sh exported/quickstart my_texts/ --trainer.max_steps=200 --trainer.accelerator=cpu \
#        --trainer.precision=32-true
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL_DIR TEXT_FOLDER [extra lit-accel fit arguments...]" >&2
  exit 2
fi
MODEL_DIR=$1
CORPUS=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIT_ACCEL=${LIT_ACCEL:-lit-accel}

# 1. Fine-tune: the LoRA callback writes runs/lora_finetune/export/{adapter,merged} when training ends.
$LIT_ACCEL fit --config "$HERE/lora_finetune.yaml" \
  --model.model "$MODEL_DIR" --data.tokenizer "$MODEL_DIR" --data.corpus "$CORPUS" "$@"

# 2. The same merged model from the last (adapter-only) checkpoint, e.g. after an interrupted run:
$LIT_ACCEL export --ckpt runs/lora_finetune/checkpoints/last.ckpt --out runs/lora_finetune/merged-from-ckpt --overwrite
echo "merged model: runs/lora_finetune/export/merged (and runs/lora_finetune/merged-from-ckpt)"
echo "PEFT adapter: runs/lora_finetune/export/adapter"
