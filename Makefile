# Two commands matter on a fresh machine: `make serve` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Machines without an NVIDIA driver take the pinned CPU torch; GPU machines take their CUDA build.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints/cpu.txt)
SHARED_NLTK := $(abspath ../shared/nltk_data)
export RAY_AUTH_MODE ?= disabled
export NLTK_DATA ?= $(if $(wildcard $(SHARED_NLTK)),$(SHARED_NLTK),)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= shapes

.PHONY: install test serve demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[test]"
	touch $@

test: install
	$(if $(shell command -v nvidia-smi 2>/dev/null),,TRITON_INTERPRET=1) $(PY) -m pytest -q $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/lvlm serve --model $(MODEL) --host $(HOST) --port $(PORT)

demo: install
	$(VENV)/bin/lvlm generate --model $(MODEL) --prompt "Describe this image."

bench: install
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/interventions.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
