# Two commands set up and check everything: `make setup` then `make test`.
PY ?= python
.PHONY: setup test test-fast quickstart lint

setup:            ## install ddlib (editable) with the test and notebook tools, torch pinned to the tested pair
	$(PY) -m pip install -e ".[dev]" -c constraints.txt

test:             ## the whole suite, notebooks included (what CI runs)
	$(PY) -m pytest -n 2

test-fast:        ## everything except the notebook executions
	$(PY) -m pytest -n 2 -m "not notebook"

quickstart:       ## distil digits with DM and compare with random real images (< 3 min on 2 CPU cores)
	$(PY) -m ddlib distill --method dm --dataset digits --ipc 1 --seed 0 --out runs/quickstart

lint:             ## ruff over the package, tests, benchmarks and notebooks (pyproject: results/ excluded)
	$(PY) -m ruff check .
