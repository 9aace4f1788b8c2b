# `make demo` and `make test` are the two set-up commands: each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NERFSTUDIO_VERSION := 1.1.5

.PHONY: install demo test lint clean

install: $(STAMP)

# Rebuilt only when pyproject.toml changes; idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps nerfstudio==$(NERFSTUDIO_VERSION)
	@# dsd-eval's report page is tested in a real headless browser: Debian's chromium (as root,
	@# from the package registry; without it that one test skips and says why)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_report_browser.py will skip"
	touch $(STAMP)

demo: install
	$(BIN)/dsd-run experiment=demo

test: install
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled WANDB_SILENT=true $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check dsd tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun
