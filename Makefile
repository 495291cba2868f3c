# The two commands a new user needs:  `make demo` (install + slm quickstart)  and  `make test`.
# torch is installed first and on its own: TORCH defaults to the CPU build; on a CUDA machine run
# e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.slmkit-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[hf,dev]"
	touch $@

demo: install
	$(BIN)/slm quickstart

lint: install
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
