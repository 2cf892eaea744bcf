# GPT pretraining pipeline. `make help` lists the targets.
# Every target installs what it needs into .venv first (no other set-up step).

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# PyTorch's CPU-only wheel index: used when the machine has no NVIDIA GPU, so
# that pip does not download a multi-GB CUDA build of torch.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.DEFAULT_GOAL := help

## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /' | column -t -s ':'

## install: create .venv and install the project with its test extras
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q "torch>=2.4"
else
	# --retries 1: where the CPU index is unreachable, fall back at once to the
	# other configured sources instead of retrying for minutes.
	$(PY) -m pip install -q --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

## test: run the test suite
test: install
	$(PY) -m pytest -q

.PHONY: help install test
