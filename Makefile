# The quick start is `make demo` and `make test`; both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint fmt typecheck pytest bench clean

# editable_mode=compat: the install is a plain path in a .pth file, which
# mypy follows; setuptools' default (an import hook) leaves `import actors`
# invisible to mypy in a project outside this repo (tests/test_packaging.py).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,grid]' --config-settings editable_mode=compat
	touch $@

demo: $(STAMP)
	$(BIN)/cellmesh demo --secure

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict actors transport

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/links.py --secure
	$(BIN)/python bench/soak.py
	$(BIN)/python -m pip install --quiet mpi4py mpich || echo "no MPI: the grid bench skips that column"
	$(BIN)/python bench/grid.py --profile

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
