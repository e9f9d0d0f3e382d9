# Two commands: `make run` and `make test`. Both create .venv and install the pinned
# dependencies (requirements.lock is a pip constraints file) when they are missing or stale.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup run test bench lock clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/modelworks run workflows/digits.py

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/train_throughput.py

# Refresh the lock from what is installed now (after changing pyproject.toml).
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^modelworks' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
