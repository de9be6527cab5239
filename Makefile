# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Both install what they need (apt packages, .venv, pip) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fonts-noto-color-emoji unicode-data g++  # g++: torch.compile's CPU code
STAMP := $(VENV)/.installed
# One torch thread per core the process really has (see README, "CPU threads").
export OMP_NUM_THREADS ?= $(shell nproc)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup apt venv test test-fast demo ablation study lint clean

setup: apt $(STAMP)

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "[setup] installing $(APT_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(STAMP): pyproject.toml constraints.txt
	@echo "[setup] creating $(VENV) and installing the project (first time: several minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tensorboard]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# The edit loop: every room, without the end-to-end and subprocess tests (marked slow).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) demo.py --output_dir runs/demo

ablation: setup
	$(PY) -m ablation --output_dir runs/ablation

study: setup
	$(PY) -m ablation --study --output_dir runs/study

clean:
	rm -rf $(VENV) runs
