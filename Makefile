# Two commands from a fresh clone:  make demo  (prepare, train tiny, sample)  and  make test.
# The data mirror: $CMED_DATA if set, else ../shared/data if present, else the public download.
CMED_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export CMED_DATA
PY := .venv/bin/python

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

install: .venv/installed

test: .venv/installed
	$(PY) -m pytest -q

.PHONY: install test
