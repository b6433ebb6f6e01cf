# Common tasks. `make train` and `make test` each set up .venv first (the README's two commands).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# constraints/cpu.txt pins the CPU build of torch; set CONSTRAINTS= to keep a torch you installed yourself.
CONSTRAINTS ?= -c constraints/cpu.txt

.PHONY: setup train test test-fast lint format smoke clean

$(BIN)/dgtrain: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

setup: $(BIN)/dgtrain

train: setup
	$(BIN)/dgtrain $(ARGS)

test: setup
	$(BIN)/pytest -q $(ARGS)

test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every recipe composes and builds, then every smoke contract runs (docs/recipes.md); ARGS: names, device=...
smoke: setup
	$(BIN)/dgtrain validate
	$(BIN)/dgtrain smoke $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
