# Each target creates .venv on first use, so both work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The suite on both cores: some files alone, then the rest side by side (tests/run_suite.sh says which, and why).
test: $(STAMP)
	tests/run_suite.sh $(BIN)/python

demo: $(STAMP)
	$(BIN)/mmsearch demo --out demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/index_throughput.py

clean-venv:
	rm -rf $(VENV)
