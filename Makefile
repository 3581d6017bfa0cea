# Every target installs what it needs into .venv first (torch/torchvision come from the local disk).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-slow lint bench pretrain finetune clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: install
	$(BIN)/python -m pytest -m slow -q

lint: install
	$(BIN)/ruff check fracgen train tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
