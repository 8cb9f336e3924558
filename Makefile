# Set-up, demo and tests. `make demo` and `make test` install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/datasets/mvtec_ad/bottle
TORCH := torch==2.14.1 torchvision==0.29.1
# Debian packages the tests need, as PACKAGE:CHECK (a command on PATH or a path pattern; see
# scripts/ensure-packages): the browser tests drive Debian's chromium; the audit tests start a throwaway
# PostgreSQL.
TEST_PACKAGES := chromium:chromium postgresql:/usr/lib/postgresql/*/bin/initdb

.PHONY: install demo test test-packages fuzz lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/gaussad evaluate $(DATA)

# The system packages first: without root to install them, `make test` stops at once, saying how.
test: test-packages install
	$(BIN)/pytest -q

test-packages:
	sh scripts/ensure-packages $(TEST_PACKAGES)

# Property-based fuzzing of image reading and model loading for FUZZ_SECONDS in all (`make test` runs a
# few fixed cases of the same properties); prints how many cases each property tried.
FUZZ_SECONDS ?= 300
fuzz: install
	HYPOTHESIS_PROFILE=fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/pytest -q -s tests/test_fuzz.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
