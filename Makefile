# The two user commands (README): `make test` (set up + run the tests) and `make demo` (set up + run the main
# job). Both create .venv with everything r4b needs, build r4b._C against the installed torch, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
STAMP := $(VENV)/.r4b-installed
SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: setup build test test-fast demo bench lint clean gpu-wheels

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q triton==$(TRITON_VERSION) "numpy<2.4" setuptools wheel cmake ninja "pybind11>=2.12"
	$(BIN)/pip install -q -e ".[test,bench]" --no-build-isolation
	touch $(STAMP)

build: setup
	$(BIN)/pip install -q -e . --no-build-isolation --no-deps

# the tests in TEST_WORKERS processes (pytest-xdist), a file per process at a time (module fixtures stay shared)
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: setup
	$(BIN)/python -m r4b.demo

bench: setup
	$(BIN)/python -m bench all

# pure-Python peers for a GPU machine without internet (bench/gpu_check.sh installs .whl/*.whl; carry .whl)
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5

lint: setup
	$(BIN)/ruff check r4b bench tests

clean:
	rm -rf build dist *.egg-info r4b/_C*.so
