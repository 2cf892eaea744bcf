# GPT pretraining pipeline. `make help` lists the targets.
# Every target installs what it needs into .venv first (no other set-up step).
#
#   make all                                    data -> train -> eval -> export -> sample
#   make train CONFIG=configs/verdict.yaml ARGS="train.epochs=2 name=verdict-2ep"
#
# The stages talk only through files, and the targets are chained by those files:
# `train` prepares the data when data/<data.name>/manifest.json is missing or older
# than the config; `eval`, `export` and `sample` train first (the train stage resumes
# an unfinished run and returns at once from a finished one).

# ---------------------------------------------------------------------------- what users type
# A value given on the command line or in the environment is text, never make syntax:
# each of these is frozen here unexpanded (`ARGS='$(shell ...)'` stays those characters),
# and recipes hand it to the shell only single-quoted (shq), so nothing in it runs.
USER_VARIABLES := ARGS CONFIG PROMPT SAMPLE_ARGS BENCH_ARGS GPU_CHECK_ARGS NUM_GPUS NUM_PROCESSES \
	ACCEL_CONFIG FAULT_TRIALS VENV PYTHON_SYS TORCH_VERSION TORCH_CPU_INDEX
$(foreach v,$(USER_VARIABLES),$(if $(filter command line environment,$(origin $(v))),\
	$(eval override $(v) := $$(value $(v)))))
define newline


endef
$(foreach v,$(USER_VARIABLES),$(if $(findstring $(newline),$(value $(v))),\
	$(error $(v) holds a line break, which would split the commands it is used in; give it on one line)))
shq = '$(subst ','\'',$(1))'
# Values that recipes use as bare words (paths, versions) must be plain: no quotes,
# spaces or shell syntax.
plain = $(if $(shell printf '%s' $(call shq,$(1)) | LC_ALL=C grep -q '[^A-Za-z0-9_./+:=,@%~-]' && echo no),,yes)
$(foreach v,VENV PYTHON_SYS TORCH_VERSION TORCH_CPU_INDEX,$(if $(call plain,$(value $(v))),,\
	$(error $(v)=$(value $(v)) is not a plain path or word (letters, digits and _./+:=,@%~- only))))
digitless = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
whole = $(and $(filter 1,$(words $(1))),$(if $(call digitless,$(1)),,yes))

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
UV         := $(VENV)/bin/uv
ACCELERATE := $(VENV)/bin/accelerate
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# What `make install` installs: exactly the lock in requirements/, for CPython 3.11 on
# Linux x86_64. lock-cpu.txt is every package but torch, whose CPU build (no CUDA
# libraries) comes at exactly TORCH_VERSION from PyTorch's CPU index, or from the wheel
# folder pip is configured with (PIP_FIND_LINKS); lock-cuda.txt, on machines with an
# NVIDIA GPU, also holds torch's CUDA build and its NVIDIA libraries. `make lock`
# renews both; pyproject.toml keeps the ranges for people who `pip install` the package.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_SOURCE = $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--index-url $(TORCH_CPU_INDEX))
LOCK = requirements/lock-$(if $(HAS_GPU),cuda,cpu).txt
# uv installs the lock in seconds (4 s for lock-cpu.txt here, pip took 83 s).
# --compile-bytecode: every stage, launcher and worker is a fresh interpreter importing
# torch, transformers and accelerate, 4.1 s from source against 2.0 s from bytecode here;
# uv writes none by default, and PYTHONDONTWRITEBYTECODE=1 (set on some machines, CI's
# among them) stops Python from caching it later.
UV_INSTALL = $(UV) pip install -q --python $(PY) --no-deps --compile-bytecode
LOCK_PLATFORM = --python-version 3.11 --python-platform x86_64-manylinux_2_28
UV_COMPILE = $(UV) pip compile -q --generate-hashes --custom-compile-command "make lock" $(LOCK_PLATFORM)

# ---------------------------------------------------------------------------- the experiment

# The experiment file, and section.key=value overrides for prepare and train
# (e.g. ARGS="train.lr=1e-3 name=lr-1e-3"); eval, export and sample read the run.
CONFIG ?= configs/tiny.yaml
ARGS   ?=

# Processes for train and eval: one per GPU (NUM_GPUS=0 forces the CPU), one on a CPU.
# The GPUs counted are the ones this job may use: CUDA_VISIBLE_DEVICES when it is set (as
# Slurm sets it for an allocation, or a user on a shared node), else all nvidia-smi lists.
VISIBLE_GPUS = $(shell if [ -n "$${CUDA_VISIBLE_DEVICES+set}" ]; then \
	printf '%s' "$$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '^[^-]'; \
	else nvidia-smi -L | grep -c '^GPU'; fi)
ifeq ($(origin NUM_GPUS),undefined)
NUM_GPUS := $(if $(HAS_GPU),$(VISIBLE_GPUS),0)
endif
NUM_PROCESSES ?= $(if $(filter 0,$(NUM_GPUS)),1,$(NUM_GPUS))
$(if $(call whole,$(NUM_GPUS)),,$(error NUM_GPUS=$(NUM_GPUS) must be a whole number: the GPUs to use, 0 for the CPU))
$(if $(and $(call whole,$(NUM_PROCESSES)),$(subst 0,,$(NUM_PROCESSES))),,\
	$(error NUM_PROCESSES=$(NUM_PROCESSES) must be a whole number of 1 or more))
FAULT_TRIALS ?= 10
$(if $(call whole,$(FAULT_TRIALS)),,$(error FAULT_TRIALS=$(FAULT_TRIALS) must be a whole number))
ifeq ($(NUM_GPUS),0)
ACCEL_CONFIG ?= configs/accelerate/$(if $(filter 1,$(NUM_PROCESSES)),cpu,cpu-2proc).yaml
else
ACCEL_CONFIG ?= configs/accelerate/$(if $(filter 1,$(NUM_PROCESSES)),single-gpu,multi-gpu).yaml
endif
ON_CPU = $(or $(filter 0,$(NUM_GPUS)),$(findstring cpu,$(notdir $(ACCEL_CONFIG))))
# On a CPU: ACCELERATE_USE_CPU=1 makes several processes form a gloo group (see
# configs/accelerate/cpu-2proc.yaml), and the cores are shared out between processes.
CPU_THREADS = $(shell n=$$(( $$(nproc) / $(NUM_PROCESSES) )); echo $$(( n > 0 ? n : 1 )))
LAUNCH = $(if $(ON_CPU),ACCELERATE_USE_CPU=1 )$(ACCELERATE) launch \
	--config_file $(call shq,$(ACCEL_CONFIG)) --num_processes $(NUM_PROCESSES) \
	$(if $(ON_CPU),--num_cpu_threads_per_process $(CPU_THREADS))

# What the user types reaches the shell only as data: `shq` (above) makes a make value
# one single-quoted shell word (nothing inside it runs), and WITH_ARGS hands the
# overrides to a command as separate words ($$ARGS split on spaces, with globbing off),
# so a backtick or $( ) in ARGS, CONFIG or PROMPT is text, never a command.
WITH_ARGS = ARGS=$(call shq,$(ARGS)); set -f;
QCONFIG = $(call shq,$(CONFIG))
# The config as a prerequisite: a path with spaces or make syntax would be read as
# several targets, so such a path makes prepare run (and decide) every time instead.
CONFIG_PREREQ = $(if $(call plain,$(CONFIG)),$(CONFIG),FORCE)

# `make sample`: the start of the text (default: the config's eval.prompt) and
# pipeline.generate's options.
PROMPT      ?=
SAMPLE_ARGS ?= --max-new-tokens 100 --temperature 0.7 --top-k 50
BENCH_ARGS  ?=

# Where this experiment's data and run live, asked from the config itself
# (python -m pipeline.config), so that ARGS="name=..." or "data.name=..." move them too.
# That needs the installed venv: for the targets below, .venv/.installed is read as a
# (empty) makefile, so make installs first when it is missing or older than
# pyproject.toml, then starts over and resolves the paths.
CONFIG_CLI = $(WITH_ARGS) $(PY) -m pipeline.config --config $(QCONFIG) $$ARGS
PATH_GOALS := data train eval export sample all book-report llama-cpp-check
ifneq ($(filter $(PATH_GOALS),$(MAKECMDGOALS)),)
include $(VENV)/.installed
endif
ifneq ($(filter $(PATH_GOALS),$(MAKECMDGOALS)),)
ifneq ($(wildcard $(VENV)/.installed),)
DATA_DIR := $(shell $(CONFIG_CLI) --get data_dir || echo CONFIG-ERROR)
RUN_DIR  := $(strip $(if $(filter CONFIG-ERROR,$(DATA_DIR)),CONFIG-ERROR,\
	$(shell $(CONFIG_CLI) --get run_dir || echo CONFIG-ERROR)))
ifneq ($(filter CONFIG-ERROR,$(DATA_DIR) $(RUN_DIR)),)
$(error CONFIG=$(CONFIG) ARGS="$(ARGS)" does not load; the message above says why)
endif
endif
endif
MANIFEST   := $(DATA_DIR)/manifest.json
EXPORT_DIR := $(RUN_DIR)/export

.DEFAULT_GOAL := help
# The stages parallelize inside; two stages at once would only fight over the cores.
.NOTPARALLEL:

## help: list the targets and the variables that steer them
help:
	@echo "usage: make TARGET [CONFIG=configs/x.yaml] [ARGS=\"section.key=value ...\"]"
	@echo
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## //' | \
		awk -F': ' '{ printf "  %-12s %s\n", $$1, substr($$0, length($$1) + 3) }'
	@echo
	@printf '  CONFIG=%s  ARGS="%s"\n' $(call shq,$(CONFIG)) $(call shq,$(ARGS))
	@printf '  NUM_GPUS=%s NUM_PROCESSES=%s ACCEL_CONFIG=%s\n' $(NUM_GPUS) $(NUM_PROCESSES) \
		$(call shq,$(ACCEL_CONFIG))
	@printf '  PROMPT="..." SAMPLE_ARGS="%s" BENCH_ARGS="%s"\n' $(call shq,$(SAMPLE_ARGS)) \
		$(call shq,$(BENCH_ARGS))

## install: create .venv holding exactly the lock (requirements/), the project and its test extras
install: $(VENV)/.installed

# A new venv each time the lock changes (venv --clear), so that it holds the lock and
# nothing left over from an older one.
$(VENV)/.installed: pyproject.toml $(LOCK) requirements/uv.txt requirements/book.txt
	$(PYTHON_SYS) -c 'import sys; v = sys.version_info[:2]; sys.exit(None if v == (3, 11) else \
		f"make install: the lock is for CPython 3.11, and $(PYTHON_SYS) is {v[0]}.{v[1]}. Run it " \
		"with PYTHON_SYS=python3.11, or install from the ranges: pip install -e \".[dev]\"")'
	$(PYTHON_SYS) -m venv --clear $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/uv.txt
ifeq ($(HAS_GPU),1)
	$(UV_INSTALL) --require-hashes -r requirements/lock-cuda.txt
else
	$(UV_INSTALL) "torch==$(TORCH_VERSION)+cpu" $(TORCH_CPU_SOURCE)
	$(UV_INSTALL) --require-hashes -r requirements/lock-cpu.txt
endif
	$(UV_INSTALL) --no-build-isolation -e .
	# The book's own code, the reference the tests hold the chapter-5 recipe against
	# (without its notebook dependencies: it needs only torch, tiktoken, matplotlib).
	$(UV_INSTALL) --require-hashes -r requirements/book.txt
	touch $@

## lock: renew requirements/ to the newest releases pyproject.toml allows, then run the suite (review the diff like code)
lock: install
	echo "torch==$(TORCH_VERSION)" | $(UV_COMPILE) --upgrade pyproject.toml requirements/tools.in - \
		--extra dev $(TORCH_CPU_SOURCE) --no-emit-package torch -o requirements/lock-cpu.txt
	echo "torch==$(TORCH_VERSION)" | $(UV_COMPILE) --upgrade pyproject.toml requirements/tools.in - \
		--extra dev -o requirements/lock-cuda.txt
	$(UV_COMPILE) --upgrade --no-deps requirements/uv.in -o requirements/uv.txt
	$(UV_COMPILE) --no-deps requirements/book.in -o requirements/book.txt
	$(UV_COMPILE) --no-deps requirements/llama-cpp.in -o requirements/llama-cpp.txt
	$(MAKE) --no-print-directory test

## test-latest: the suite against the newest releases of every dependency, in .venv-latest (the lock is untouched)
LATEST := .venv-latest
test-latest: install
	$(PYTHON_SYS) -m venv --clear $(LATEST)
	$(UV) pip install -q --python $(LATEST)/bin/python --upgrade -e ".[dev]" \
		"torch==$(TORCH_VERSION)$(if $(HAS_GPU),,+cpu)" $(if $(HAS_GPU),,$(TORCH_CPU_SOURCE))
	$(UV) pip install -q --python $(LATEST)/bin/python --no-deps --require-hashes -r requirements/book.txt
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	GPT_PIPELINE_UNLOCKED=1 $(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

## data: tokenize the corpus into data/<data.name>/ (a no-op when up to date)
data: install
	$(WITH_ARGS) $(PY) -m pipeline.prepare --config $(QCONFIG) $$ARGS
	touch $(call shq,$(MANIFEST))

# The manifest is remade when missing or older than the config, and whenever ARGS
# touch a data.* key (prepare itself then decides: nothing to do, or refuse to mix).
$(MANIFEST): $(CONFIG_PREREQ) $(if $(findstring data.,$(ARGS)),FORCE) | install
	$(WITH_ARGS) $(PY) -m pipeline.prepare --config $(QCONFIG) $$ARGS
	touch $(call shq,$@)

## train: train (or resume) runs/<name>/ with accelerate, one process per GPU
train: $(MANIFEST)
	$(WITH_ARGS) $(LAUNCH) -m pipeline.train --config $(QCONFIG) $$ARGS

## eval: val loss and perplexity of the run's latest checkpoint -> runs/<name>/eval.json
eval: train
	$(LAUNCH) -m pipeline.evaluate --model $(call shq,$(RUN_DIR))

## export: the run to the Hugging Face GPT-2 layout in runs/<name>/export/
export: train
	$(PY) -m pipeline.export --model $(call shq,$(RUN_DIR))

# `sample` uses the export that is there; only a missing one is made (train + export).
$(EXPORT_DIR)/model.safetensors:
	$(MAKE) --no-print-directory export

## sample: print text from the exported model (PROMPT="..." to choose the start)
sample: $(EXPORT_DIR)/model.safetensors
	SAMPLE_ARGS=$(call shq,$(SAMPLE_ARGS)); set -f; \
	$(PY) -m pipeline.generate --model $(call shq,$(EXPORT_DIR)) $$SAMPLE_ARGS \
		--prompt $(if $(PROMPT),$(call shq,$(PROMPT)),"$$($(CONFIG_CLI) --get eval.prompt)")

## all: the whole pipeline: data -> train -> eval -> export -> sample
all: data train eval export sample

## book: the book's chapter 5 run (configs/verdict.yaml): train, then its table beside the book's, figure 5.12, samples
# The Verdict is downloaded once; without a network give the file:
#   make book ARGS="data.source.url=file:///path/to/the-verdict.txt"
book:
	$(MAKE) --no-print-directory book-report CONFIG=configs/verdict.yaml

## book-appendix-d: appendix D's run (configs/appendix-d.yaml, ~12 min on 2 cores): its evaluations beside the book's
book-appendix-d:
	$(MAKE) --no-print-directory book-report CONFIG=configs/appendix-d.yaml

book-report: train
	$(WITH_ARGS) $(PY) -m pipeline.book --config $(QCONFIG) $$ARGS

## test: lint and format check (ruff), then run the test suite
# One pytest worker per core (pytest-xdist), each test file whole on one worker so its
# module fixtures (a prepared data set, a trained run) are built once; the 25 slowest
# tests are listed at the end, so the suite's cost is visible in every run.
PYTEST_ARGS = -q -n auto --dist loadfile --durations=25
test: install
	$(PY) -m ruff check --quiet pipeline tests benchmarks
	$(PY) -m ruff format --check --quiet pipeline tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

## golden: retrain the reference runs behind tests/golden/losses.json on this machine
# Parity tests compare against the losses of a one-process, one-thread reference run kept
# in that file (keyed by CPU kind, torch version and data); this retrains each reference
# and rewrites this machine's entries. Run it after a change that moves the numbers.
golden: install
	GOLDEN_WRITE=1 $(PY) -m pytest -q -p no:xdist -m golden

## faults: SIGKILL prepare and train at random moments, FAULT_TRIALS times each (not in CI)
faults: install
	FAULT_TRIALS=$(call shq,$(FAULT_TRIALS)) $(PY) -m pytest -q -s tests/test_faults.py

## bench: time to a val loss against HF Trainer, step, decoding, data speed -> benchmarks/results/ (BENCH_ARGS=--quick: smoke)
bench: install
	BENCH_ARGS=$(call shq,$(BENCH_ARGS)); set -f; $(PY) -m benchmarks $$BENCH_ARGS

## gpu-check: on one GPU, no network, <8 min: parity, fp16/bf16, resume, FSDP, 124M speed -> gpu-check-results/
# GPU_CHECK_ARGS=--cpu runs the same steps on tiny shapes on the CPU (as the suite does).
gpu-check: install
	GPU_CHECK_ARGS=$(call shq,$(GPU_CHECK_ARGS)); set -f; $(PY) -m benchmarks.gpu_check $$GPU_CHECK_ARGS

## llama-cpp-check: train, then llama.cpp itself on the run's GGUF export: same tokens, logits, greedy text (builds llama-cpp-python once, ~6 min)
# LLAMA_CPP_ARGS adds options (--dtype fp16, --new-tokens 40, --prompt TEXT, --model DIR).
# llama-cpp-python compiles llama.cpp from source, so it lives in .llama-cpp/ (pip --target,
# on PYTHONPATH for this target only), not in the lock .venv holds.
LLAMA_CPP_DIR = .llama-cpp
llama-cpp-check: train $(LLAMA_CPP_DIR)/.installed
	LLAMA_CPP_ARGS=$(call shq,$(LLAMA_CPP_ARGS)); set -f; \
	PYTHONPATH=$(LLAMA_CPP_DIR) $(PY) -m benchmarks.llama_cpp_check \
		--model $(call shq,$(RUN_DIR)) $$LLAMA_CPP_ARGS

$(LLAMA_CPP_DIR)/.installed: requirements/llama-cpp.txt | install
	rm -rf $(LLAMA_CPP_DIR)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(UV) pip install -q --python $(PY) --no-deps \
		--require-hashes --target $(LLAMA_CPP_DIR) -r requirements/llama-cpp.txt
	touch $@

## bench-report: write docs/performance.md from benchmarks/results/*.json
bench-report: install
	$(PY) -m benchmarks.report

# The bytecode of the project's own sources. Not `find .`: that reached the venv's
# (precompiled by make install; a VENV given as an absolute path escaped the exclusion)
# and any folder of the user's under the checkout.
CLEAN_BYTECODE = find pipeline tests benchmarks -name __pycache__ -type d -prune -exec rm -rf {} +

## clean: delete this CONFIG's run directory and prepared data (only what the project wrote)
# pipeline.clean deletes only directories this project wrote (a run's config.yaml, a
# data set's manifest), so no config value can point it at anything else.
clean:
	@if [ -x $(PY) ]; then $(WITH_ARGS) $(PY) -m pipeline.clean --config $(QCONFIG) $$ARGS; \
	else echo "no $(VENV): nothing to clean by config (make distclean removes all made here)"; fi
	$(CLEAN_BYTECODE)

## distclean: delete everything made here: .venv, data/, runs/, wandb/, caches
distclean:
	rm -rf -- $(VENV) $(LATEST) $(LLAMA_CPP_DIR) data runs wandb .pytest_cache *.egg-info
	$(CLEAN_BYTECODE)

FORCE:

.PHONY: help install lock test-latest data train eval export sample all book book-appendix-d book-report test golden faults bench gpu-check llama-cpp-check bench-report clean distclean FORCE
