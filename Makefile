# The two commands a new user needs:  `make demo` (install + slm quickstart)  and  `make test`.
# torch is installed first and on its own: TORCH defaults to the CPU build; on a CUDA machine run
# e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Extras: the tests exercise all of them; llama-cpp-python compiles from source the first time (~8-15 minutes on
# 2 cores; pip caches the wheel), so `make demo` installs only what the quickstart needs.
EXTRAS ?= hf,dev,onnx,llamacpp,serve,eval,kb,vision
DEMO_EXTRAS ?= hf,dev,serve
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.slmkit-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	case ",$(EXTRAS)," in *,eval,*) $(BIN)/python -m slmkit.eval.lm_eval.adapter --install-hook ;; esac
	touch $@

demo:
	$(MAKE) install EXTRAS=$(DEMO_EXTRAS)
	$(BIN)/slm quickstart

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports  # the package layers in pyproject.toml ([tool.importlinter])

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
