# Set-up commands: `make demo` trains the demo model; `make test` runs the test suite.
# Both create (or reuse) .venv and install the pinned dependencies first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test test-all test-aot clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) main.py --config=configs/demo.py --workdir=$(WORKDIR)

# Two workers (the CI machine's 2 cores); each test file stays on one worker, so its
# module fixtures (shared compiled steps) are built once.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-all: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,notebook]"  # The notebook's slow test.
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# tools/aot_compile.py's compiles for TPU slices, in a venv of their own with the TPU
# compiler (libtpu, about 0.7 GB; never in .venv: it would slow every test process's
# jax start-up). Runs on any host, no TPU needed.
VENV_TPU := .venv-tpu
STAMP_TPU := $(VENV_TPU)/.installed

$(STAMP_TPU): setup.py
	$(PYTHON) -m venv $(VENV_TPU) || python3 -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TPU)/bin/python -m pip install --quiet -e ".[test,tpu]"
	touch $(STAMP_TPU)

test-aot: $(STAMP_TPU)
	$(VENV_TPU)/bin/python -m pytest -q -n $(TEST_WORKERS) tests/test_aot.py

clean:
	rm -rf $(VENV) $(VENV_TPU) runs
