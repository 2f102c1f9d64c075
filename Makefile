# The two set-up commands of the README:
#   make serve   install everything, build the default model if none is stored, serve it on :3000
#   make test    install everything, run the default test suite
# Both create/update the virtual environment themselves (.venv, or VENV=...).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nanomorph-installed
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: serve test venv lint bench bench-ssl reliability slow-test clean-demo bento bento-requirements

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[training,serving,dev,reliability]'
	@touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	exec env HF_HUB_OFFLINE=1 $(BIN)/nanomorph serve --build-default --host $(HOST) --port $(PORT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

slow-test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy nanomorph service training

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/pretrain_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/onnx_vs_torch.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve_overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/large_frames.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/malloc_trim.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/malloc_trim.py --no-trim

DATA ?= ../shared/data/emps-train
bench-ssl: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ssl_quality.py --data $(DATA) --work runs/ssl_quality \
		--steps 150 --image-size 96 --crop-size 192 --plain-match-cpu

reliability: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m reliability

# The bento's package list comes from pyproject.toml ([tool.nanomorph.bento]), never typed twice.
bento-requirements: $(STAMP)
	$(BIN)/python scripts/bento_requirements.py

bento: bento-requirements
	$(BIN)/bentoml build

clean-demo:
	rm -rf demo
