#!/usr/bin/env bash
# Sheared-LLaMA recipe: (1) prune with learned structured masks and dynamic batch loading, (2) export a physically
# smaller Hugging Face model, (3) continue pre-training it, (4) export the result. Every stage is resumable: a
# finished stage is skipped when the script runs again from the same inputs (configs, SOURCE, TARGET), an
# interrupted one resumes from its last checkpoint; a run with other inputs over a finished one is refused.
#
#   TINY=1 recipes/prune_continue/run.sh                      # CPU, under a minute, outputs in runs/prune_continue_tiny/
#   SOURCE=exported/llama-1b recipes/prune_continue/run.sh    # GPU: llama-1b -> llama-1b-half, in runs/prune_continue/
#
# Environment:
#   TINY           1: the CPU configs (prune_tiny.yaml, continue_tiny.yaml); else the GPU ones (prune.yaml, continue.yaml)
#   SOURCE         the model to prune: a Hugging Face model directory (its tokenizer is used) or a preset name;
#                  default: the config's (a randomly initialised preset)
#   TARGET         a preset name (e.g. llama-1b-half, llama-20m-half, llama-125m) or a parameter ratio in (0, 1);
#                  default: the config's StructuredPruning target
#   PRUNE_ARGS     extra `lit-accel fit` arguments for stage 1 (e.g. "--trainer.max_steps=200")
#   CONTINUE_ARGS  extra `lit-accel fit` arguments for stage 3
#   LIT_ACCEL      the lit-accel command (default: lit-accel)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIT_ACCEL=${LIT_ACCEL:-lit-accel}
if [[ "${TINY:-0}" == 1 ]]; then
  RUN=runs/prune_continue_tiny
  PRUNE_CONFIG=$HERE/prune_tiny.yaml
  CONTINUE_CONFIG=$HERE/continue_tiny.yaml
else
  RUN=runs/prune_continue
  PRUNE_CONFIG=$HERE/prune.yaml
  CONTINUE_CONFIG=$HERE/continue.yaml
fi
PRUNE_CKPT=$RUN/prune/checkpoints/last.ckpt
PRUNED=$RUN/pruned
CONTINUE_CKPT=$RUN/continue/checkpoints/last.ckpt
FINAL=$RUN/final
mkdir -p "$RUN"
# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
PRUNE_EXTRA=(${PRUNE_ARGS:-})
# shellcheck disable=SC2206
CONTINUE_EXTRA=(${CONTINUE_ARGS:-})

source_args=()
tokenizer_args=()  # both training stages tokenise alike, so stage 3 reuses stage 1's cached token shards
if [[ -n "${SOURCE:-}" ]]; then
  source_args=(--model.model "$SOURCE" --model.config_overrides null)
  if [[ -d "$SOURCE" ]]; then
    if [[ ! -f "$SOURCE/tokenizer_config.json" ]]; then
      echo "SOURCE=$SOURCE holds no tokenizer (tokenizer_config.json); the pruned model must read its own tokens" >&2
      exit 2
    fi
    tokenizer_args=(--data.tokenizer "$SOURCE")
  fi
elif [[ "${TINY:-0}" != 1 ]]; then
  echo "note: no SOURCE given: pruning a randomly initialised preset (set SOURCE=<trained model dir>)" >&2
fi

# StructuredPruning is the last callback of the pruning configs, so --trainer.callbacks.init_args.* set its arguments.
target_args=()
if [[ -n "${TARGET:-}" ]]; then
  set_cb=--trainer.callbacks.init_args
  dims=("$set_cb.num_layers=null" "$set_cb.num_kv_heads=null" "$set_cb.intermediate_size=null" "$set_cb.hidden_size=null")
  if [[ "$TARGET" =~ ^0?\.[0-9]+$ ]]; then
    target_args=("${dims[@]}" "$set_cb.preset=null" "$set_cb.param_ratio=$TARGET")
  else
    target_args=("${dims[@]}" "$set_cb.param_ratio=null" "$set_cb.preset=$TARGET")
  fi
fi

# What the stages compute from: the configs' contents, SOURCE (a directory by its config and weight files' sizes
# and times) and TARGET. PRUNE_ARGS / CONTINUE_ARGS are not part of it (loggers, step counts); a resumed stage
# checks its own checkpoint against its configuration anyway.
source_id=${SOURCE:-}
if [[ -n "${SOURCE:-}" && -d "$SOURCE" ]]; then
  source_id="$SOURCE $(cat "$SOURCE/config.json" 2>/dev/null || true)"
  source_id+=" $(cd "$SOURCE" && ls -l --time-style=+%s -- *.safetensors *.bin 2>/dev/null || true)"
fi
INPUTS=$({ cat "$PRUNE_CONFIG" "$CONTINUE_CONFIG"; printf '%s\n' "TINY=${TINY:-0}" "SOURCE=$source_id" "TARGET=${TARGET:-}"; } \
  | sha256sum | cut -c1-16)

# stage_done NAME: true when NAME finished earlier from these inputs; refuses when it finished from other ones
# (its outputs would be stale), so that a run with another SOURCE or TARGET never reports the old model.
stage_done() {
  local marker=$RUN/$1.done
  [[ -f "$marker" ]] || return 1
  if [[ "$(head -n 1 "$marker")" == "inputs $INPUTS" ]]; then
    echo "[$1] finished earlier from these inputs ($marker): skipped"
    return 0
  fi
  echo "[$1] $RUN holds the outputs of a run with other inputs (configs, SOURCE or TARGET; $marker records" \
    "'$(head -n 1 "$marker")', this run is 'inputs $INPUTS'). Move $RUN away (or delete it) to start over." >&2
  exit 2
}

mark_done() {  # NAME COMMAND...: the inputs first, then the command for people
  printf 'inputs %s\n%s\n' "$INPUTS" "${*:2}" >"$RUN/$1.done"
}

# fit_stage NAME CONFIG ARGS...: skip when done from these inputs, else fit (resuming from the stage's last.ckpt).
fit_stage() {
  local name=$1 config=$2
  shift 2
  stage_done "$name" && return
  echo "[$name] lit-accel fit --config $config $*"
  $LIT_ACCEL fit --config "$config" --ckpt_path last "$@"
  mark_done "$name" fit --config "$config" "$@"
}

# export_stage NAME CKPT OUT: skip when done from these inputs, else `lit-accel export` (OUT appears complete).
export_stage() {
  local name=$1 ckpt=$2 out=$3
  if stage_done "$name" && [[ -f "$out/config.json" ]]; then
    return
  fi
  echo "[$name] lit-accel export --ckpt $ckpt --out $out"
  $LIT_ACCEL export --ckpt "$ckpt" --out "$out" --overwrite
  mark_done "$name" export --ckpt "$ckpt" --out "$out"
}

# 1. Prune: masks and weights train together; the reference losses are the source model's (measured first).
fit_stage prune "$PRUNE_CONFIG" "${source_args[@]}" "${tokenizer_args[@]}" "${target_args[@]}" "${PRUNE_EXTRA[@]}"
# 2. Export: drop the masked layers/heads/channels/dims; the export reloads it with from_pretrained and checks logits.
export_stage export "$PRUNE_CKPT" "$PRUNED"
# 3. Continue pre-training the smaller model on the same domains (same tokenizer as stage 1: SOURCE's, or the same
#    cached BPE, which the export also copied into $PRUNED), against the same reference losses.
fit_stage continue "$CONTINUE_CONFIG" --model.model "$PRUNED" "${tokenizer_args[@]}" \
  --data.reference_losses "$PRUNE_CKPT" "${CONTINUE_EXTRA[@]}"
# 4. The continued model as a Hugging Face directory.
export_stage final "$CONTINUE_CKPT" "$FINAL"
echo "pruned model:    $PRUNED"
echo "continued model: $FINAL"
