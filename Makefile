# The two commands README promises: `make demo` (the main job, embedded default) and `make test`.
# Each creates the virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergeflow demo

test: $(STAMP)
	$(VENV)/bin/ruff check merging tasks flows tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
