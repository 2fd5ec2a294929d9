# The quick start: `make run` (the IM system) and `make test` (everything CI checks).
# Both create ./.venv (or $(VENV)) with the dev and docs extras on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint docs smoke bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,docs]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m examples.cluster --dev

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy --strict src tests examples
	$(VENV)/bin/lint-imports

docs: $(STAMP)
	PYTHON=$(PY) sh scripts/build_docs.sh    # mkdocs --strict: warnings fail it

test: lint docs
	$(PY) -m coverage run -m pytest -q
	$(PY) -m coverage report    # floor 1, branches; fails under 90%
	PY=$(PY) bash scripts/quickstart_smoke.sh

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
