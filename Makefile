# sfllava-mlx: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
# MLX's Linux CPU wheel links a slow reference BLAS; Debian's OpenBLAS is ~40x faster.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
EXTRAS := test,eval
ifeq ($(UNAME),Linux)
TORCH_PIN := torch==2.13.0
RUN_ENV := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS),)
else
TORCH_PIN := torch
RUN_ENV :=
endif

.PHONY: setup system-deps demo test test-fast lint profile clean

$(BIN)/sfllava: pyproject.toml
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on this Linux image the pin resolves to a local CPU wheel.
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(BIN)/sfllava

setup: $(BIN)/sfllava

# ffmpeg makes the long-GOP H.264/HEVC test videos, tmux drives the chat in a real terminal,
# Debian's chromium runs the page's tests (Playwright drives it: no browser download);
# OpenBLAS speeds MLX's CPU backend.
system-deps:
ifeq ($(UNAME),Linux)
	@if ! command -v ffmpeg >/dev/null || ! command -v tmux >/dev/null || [ ! -e $(OPENBLAS) ] \
	    || [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq ffmpeg libopenblas0-pthread tmux chromium) >/dev/null; \
	  else echo "note: install ffmpeg, tmux, chromium and libopenblas0-pthread for the full test suite"; fi; \
	fi
else
	@command -v ffmpeg >/dev/null || echo "note: 'brew install ffmpeg' enables the H.264/HEVC tests"
endif

demo: setup
	$(RUN_ENV) $(BIN)/python -m sfllava_app.demo

test: setup
	$(RUN_ENV) $(BIN)/python -m pytest -q --durations=15 tests

# The edit loop: under a minute, without the slow, server and browser tests.
test-fast: setup
	$(RUN_ENV) $(BIN)/python -m pytest -q -m "not slow and not server and not browser" tests

# ruff's rules are in pyproject.toml; .ci/run lints before it tests.
lint: setup
	$(BIN)/ruff check sfllava_mlx app convert tests bench

# A representative profile for the machine at hand: on Linux's CPU backend 128 frames would
# take most of an hour, so fewer; on a Mac the real case, 128 frames of the 4-bit 1.5B model.
profile: setup
ifeq ($(UNAME),Linux)
	$(RUN_ENV) $(BIN)/sfllava bench --random-weights 1.5b --frames 8 --max-tokens 8 --runs 2 --calibrate
else
	$(BIN)/sfllava bench --random-weights 1.5b --q-bits 4 --runs 3
endif

clean:
	rm -rf $(VENV) demo *.egg-info
