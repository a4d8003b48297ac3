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

# The training tests run in a process of their own: after the rest of the suite (ONNX Runtime, OpenVINO,
# Ray and server threads in one long-lived process) an in-process gloo step crashed pytest with SIGSEGV
# twice here, while the same tests pass in a fresh process.
# The second process takes the session's tiny encoder from the first (MMSEARCH_TEST_SHARE, tests/conftest.py).
test: $(STAMP)
	@share=$$(mktemp -d) && trap 'rm -rf "$$share"' EXIT && set -x && \
	MMSEARCH_TEST_SHARE=$$share $(BIN)/python -m pytest -q tests --ignore-glob='tests/test_train*.py' && \
	MMSEARCH_TEST_SHARE=$$share $(BIN)/python -m pytest -q tests/test_train*.py

demo: $(STAMP)
	$(BIN)/mmsearch demo --out demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/index_throughput.py

clean-venv:
	rm -rf $(VENV)
