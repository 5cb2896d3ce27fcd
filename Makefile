# One-command entry points. `make test` works from a fresh clone: it creates .venv if needed.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
STAMP = $(VENV)/.trustrl-installed
BASE_STAMP = $(VENV)/.trustrl-base-installed

.PHONY: test install demo sanity clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(VENV)/bin/python setup.py
	$(PIP) install -q -e ".[test,hf]"
	touch $(STAMP)

$(BASE_STAMP): $(VENV)/bin/python setup.py
	$(PIP) install -q -e .
	touch $(BASE_STAMP)

install: $(STAMP)

# The embedded default: DPPO-Binary-TV on synthetic addition, tiny model, CPU, a few minutes.
demo: $(BASE_STAMP)
	$(VENV)/bin/python -m trustrl.main --config=configs/default.py --workdir=workdirs/default

# The laptop-scale sanity study of docs/results.md (~2 h on 2 CPU cores; finished runs are reused).
sanity: $(BASE_STAMP)
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --parallel=2 --out=docs
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --parallel=2 --out=docs --stress
	$(VENV)/bin/python launch/sanity.py --workdir=workdirs/sanity --out=docs --mismatch_profile

# 8 simulated CPU devices are set in tests/conftest.py before jax is imported.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) *.egg-info
