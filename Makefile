# Set-up commands: `make demo` trains the demo model; `make test` runs the test suite.
# Both create (or reuse) .venv and install the pinned dependencies first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test test-all clean

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
	$(PY) -m pytest -q -m "not slow" --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

test-all: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,notebook]"  # The notebook's slow test.
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs
