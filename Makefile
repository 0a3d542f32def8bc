# Everything a fresh machine needs: `make serve` starts the server on the demo models, `make test`
# runs the whole suite. Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed before the package so pip keeps it. Which build the pin resolves to depends on the
# machine's package index (a CPU-only wheel, or PyPI's CUDA build); override TORCH_SPEC to choose.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: serve test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/genserve serve $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/batching.py $(ARGS)

clean:
	rm -rf $(VENV) genserve-data .pytest_cache
