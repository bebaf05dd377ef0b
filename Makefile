# `make test` and `make quickstart` build .venv on first use. CONSTRAINTS pins the CPU build of torch
# that lies on disk on CPU-only machines; on a GPU machine run `make test CONSTRAINTS=` to keep your torch.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
CACHE ?= $(or $(MEGATRON_SUBNET_CACHE),$(HOME)/.cache/megatron_subnet)
PY := $(VENV)/bin/python
TEACHER := $(CACHE)/smollm2-135m-instruct
CORPUS := $(CACHE)/demo_corpus/corpus.jsonl
export OMP_NUM_THREADS ?= 1
export MEGATRON_SUBNET_CACHE := $(CACHE)
# DeepSpeed JIT-builds a small comm op on CPU; one build cache per venv stops two venvs rebuilding it in turn.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: test test-fast quickstart lint venv teacher corpus

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,gguf]'
	touch $@

teacher: $(TEACHER)/model.safetensors
$(TEACHER)/model.safetensors: | $(VENV)/.installed
	$(PY) tools/fetch_teacher.py --output $(TEACHER)

corpus: $(CORPUS)
$(CORPUS): | $(VENV)/.installed
	$(PY) tools/fetch_demo_corpus.py --output $(CORPUS)

data/demo_text_document.idx: $(CORPUS) $(TEACHER)/model.safetensors
	$(PY) tools/preprocess_data.py --input $(CORPUS) --output-prefix data/demo --workers 2 --append-eod \
	    --tokenizer-type HuggingFaceTokenizer --tokenizer-model $(TEACHER)

test: $(VENV)/.installed teacher
	$(PY) -m pytest -q tests

# the inner loop: everything but the end-to-end subprocess runs (marked slow); at least one equivalence test per area
test-fast: $(VENV)/.installed teacher
	$(PY) -m pytest -q -m "not slow" tests

quickstart: data/demo_text_document.idx
	PYTHON=$(PY) DEEPSPEED=$(VENV)/bin/deepspeed PATH=$(abspath $(VENV))/bin:$$PATH examples/quickstart.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
