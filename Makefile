# lit_accel: the README's two commands are `make quickstart` and `make test`; both set everything up first.
# On a CPU machine `torch==2.13.0` is a local CPU build; on a GPU machine pass e.g. TORCH="torch" (a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install quickstart test test-gpu lint typecheck bench clean

install: $(VENV)/.installed

# torch first, so no later requirement can pull a multi-GB CUDA build; DeepSpeed without build isolation, so its
# build uses that torch instead of downloading another into an isolated build environment.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation "$(DEEPSPEED)"
	$(PIP) install -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/lit-accel fit --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules lit_accel  # the docstrings' examples

test-gpu: install
	$(BIN)/python -m pytest -q -m "gpu or multigpu"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lit_accel

bench: install
	$(BIN)/python -m benchmarks run
	$(BIN)/python -m benchmarks render

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .mypy_cache .ruff_cache
