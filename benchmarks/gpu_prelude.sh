# Sourced from the repository root on a GPU machine without the project installed (see benchmarks/README.md):
# installs the wheels carried in .whl (deepspeed, wandb, liger-kernel, ...) beside the machine's torch, puts the
# checkout and them on PYTHONPATH, keeps wandb offline, and makes $OUT (the folder for results) if none is set.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
