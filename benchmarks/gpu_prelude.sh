# Sourced by the benchmarks/gpu_*.sh device scripts (from the repository root on the device machine): installs the
# wheels carried in .whl (deepspeed, wandb, ...) beside the machine's torch, puts the checkout and them on
# PYTHONPATH, keeps wandb offline, and makes $OUT (the folder whose files come back) if the device tool set none.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
