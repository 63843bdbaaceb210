# Two commands matter on a fresh machine: `make serve` and `make test`. Both install what they need.
# Nothing here forces the Hugging Face hub offline: `make serve MODEL=<hub id>` downloads the
# checkpoint. The test suite sets what it needs itself (tests/conftest.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without nvidia-smi, torch is pinned by constraints/cpu.txt (the version the suite is checked
# with); with it, pip resolves torch from your package index unpinned (PyPI's Linux x86-64 wheel is
# a CUDA build). To keep a torch you built or installed yourself, install into that environment
# with `pip install -e .` instead of using this Makefile.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints/cpu.txt)
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= shapes

.PHONY: install test serve demo bench gpu-check gpu-wheels clean test-newest-transformers lmms-eval-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[test]"
	@# CHAIR's NLTK data (found in NLTK_DATA, ../shared/nltk_data or ~/.cache/lvlm/nltk_data, else
	@# fetched there); offline this prints the command to run later and the install goes on.
	-$(PY) -m lvlm_hallu.eval.nltk_data
	touch $@

# On TEST_WORKERS pytest-xdist workers (2 by default; 0: in this process, one test at a time). The
# modules that start Ray form two units, one Ray instance per worker (tests/conftest.py,
# docs/testing.md "In parallel").
TEST_WORKERS ?= 2
test: install lmms-eval-venv
	$(if $(shell command -v nvidia-smi 2>/dev/null),,TRITON_INTERPRET=1) LVLM_LMMS_PYTHON=$(LMMS_VENV)/bin/python \
		$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# lmms-eval (tests/ecosystem, docs/ecosystem.md) in a venv of its own, with this project and its
# `lmms-eval` extra: lmms-eval keeps our transformers, but its dependencies would downgrade protobuf
# and python-dateutil in $(VENV). PyPI's torchvision is a CUDA build whose operators do not load
# with the CPU torch, and transformers imports torchvision whenever it is installed, so the CPU
# venv goes without it (lmms-eval's core and the POPE tasks never use it).
# The venv is shared by the checkouts of this machine and its editable install points at one of
# them: the stamp names the checkout, so another checkout's `make test` re-points it here.
LMMS_VENV ?= $(or $(TMPDIR),/tmp)/lvlm-hallu-lmms-eval
CHECKOUT_ID := $(shell printf %s "$(CURDIR)" | sha1sum | cut -c1-12)
lmms-eval-venv: $(LMMS_VENV)/.installed-$(CHECKOUT_ID)

$(LMMS_VENV)/.installed-$(CHECKOUT_ID): pyproject.toml constraints/cpu.txt
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	rm -f $(LMMS_VENV)/.installed*
	$(LMMS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMMS_VENV)/bin/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[lmms-eval]"
	$(if $(CONSTRAINTS),$(LMMS_VENV)/bin/python -m pip uninstall -q -y torchvision,)
	touch $@

serve: install
	$(VENV)/bin/lvlm serve --model $(MODEL) --host $(HOST) --port $(PORT)

# One held-out shapes image where the default interventions remove a hallucinated object.
demo: install
	$(VENV)/bin/lvlm demo --model $(MODEL)

# Checking a new transformers release: the suite in a scratch venv with the newest transformers,
# whatever pyproject.toml's range says. When it passes, widen the range there (README, "Versions").
NEWEST_VENV ?= $(or $(TMPDIR),/tmp)/lvlm-hallu-newest-transformers
test-newest-transformers:
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[test]"
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) transformers
	@$(NEWEST_VENV)/bin/python -c "import transformers; print('testing transformers', transformers.__version__)"
	$(if $(shell command -v nvidia-smi 2>/dev/null),,TRITON_INTERPRET=1) $(NEWEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/interventions.py

# The whole GPU validation (kernel checks at LLaVA-1.5-7B shapes for every flag combination, the
# kernel, intervention, decode and load benchmarks) into docs/gpu-check.md; without a GPU a dry
# run that says what it skips. On a lent GPU machine it runs with the system Python when the
# project's venv is absent, with no install step; where that image lacks what the engine steps
# need (transformers 5.17 there, no FastAPI/pydantic), the script installs the wheels carried in
# .whl/ (`make gpu-wheels`) into a temporary folder first. docs/kernels.md, "make gpu-check".
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Run here (a package index is needed) before a device call: the wheels of the installed
# transformers and web stack, for the lent machines' Python 3.12 on x86-64, into .whl/ (ignored
# by git; the device call names it in `carry`). docs/kernels.md, "A lent GPU".
GPU_WHEELS ?= .whl
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $$($(PY) benchmarks/gpu_check.py --wheel-list)
	@ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
