# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Both install what they need (apt packages, .venv, pip) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fonts-noto-color-emoji unicode-data g++  # g++: torch.compile's CPU code
APP_APT_PACKAGES := chromium chromium-driver  # the app's test drives a real (headless) browser
STAMP := $(VENV)/.installed
APP_STAMP := $(VENV)/.installed-app
# One torch thread per core the process really has (see README, "CPU threads").
export OMP_NUM_THREADS ?= $(shell nproc)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-app apt apt-app venv test test-fast demo app ablation study study-continue lint clean

setup: apt $(STAMP)

# The browser app's extra (gradio, selenium) and the browser its test drives.
setup-app: setup apt-app $(APP_STAMP)

define apt_install
	@if ! dpkg -s $(1) >/dev/null 2>&1; then \
	  echo "[setup] installing $(1)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1); \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES))

apt-app:
	$(call apt_install,$(APP_APT_PACKAGES))

$(STAMP): pyproject.toml constraints.txt
	@echo "[setup] creating $(VENV) and installing the project (first time: several minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tensorboard]'
	@touch $(STAMP)

$(APP_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tensorboard,app]'
	@touch $(APP_STAMP)

# Tests: one pytest-xdist worker per core, one torch thread each (a test is too small for two threads
# to pay); the slow tests start first (tests/conftest.py) and an idle worker takes over queued ones.
# At most 4 workers: each holds its own torch and test fixtures (up to ~4 GiB at the suite's peak).
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test: setup-app
	$(PYTEST) tests

# The edit loop: every room, without the end-to-end and subprocess tests (marked slow).
test-fast: setup
	$(PYTEST) -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) demo.py --output_dir runs/demo

# The demo's tokenizer and prior in the browser (after `make demo`): http://127.0.0.1:7860
app: setup-app
	$(PY) -m provq.app --tokenizer runs/demo/tok/tokenizer --prior runs/demo/prior/prior --dataset emoji

ablation: setup
	$(PY) -m provq.ablation --output_dir runs/ablation

study: setup
	$(PY) -m provq.ablation --study --output_dir runs/study

# The study of docs/results/study_plan.yaml: what its ledger lacks, version by version, two one-thread
# shards; stop it with Ctrl-C or SIGTERM (the runs keep their checkpoints) and run it again to continue.
study-continue: setup
	$(PY) -m provq.ablation.plan --continue

clean:
	rm -rf $(VENV) runs
