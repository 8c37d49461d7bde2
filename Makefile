# The two commands of the Quick start are `make demo` and `make test`; both bootstrap a
# virtualenv in .venv from pyproject.toml on first use, so a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test tools lint check bench clean

$(STAMP): pyproject.toml setup.py proxy/ingress/_compiled.pyx
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)  # KEEP=1: stay up (with a trickle of traffic) to look at the console, until Ctrl-C
	$(PY) -m loadtest.demo $(if $(KEEP),--keep)

# The system programs some tests drive (nginx, wrk, node, chromium, promtool, ...) and the C compiler
# the compiled prepare() is built with: installed with apt-get when run as root, quiet when all are
# there; elsewhere it prints the command to run and those tests skip naming the package. The table is
# tests/system_tools.py (stdlib only: it runs before the virtualenv, so the compiler is there for its install).
tools:
	$(PYTHON) tests/system_tools.py install

# The style goals, checked: types (mypy --strict), lint and import order (ruff), and the
# architecture's import contracts (import-linter). Configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# The virtualenv may have been made before the compiler was there (`make demo` first): then its compiled
# prepare() is built now, so the tests check it rather than fail on its absence.
test: tools $(STAMP) lint
	$(PY) -c "import proxy.ingress._compiled" 2>/dev/null || ! command -v cc >/dev/null || $(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pytest -q -rs

check: $(STAMP)  # every shipped rules file passes `splitter check`, with the placeholder environment the tests use
	$(PY) -m pytest -q tests/test_cli_engine.py -k every_shipped_rules_file

# One table: loadtest.bench runs every contender side by side (splitter in both durability modes), the
# stalled upstreams, the floor and decide() in one run and prints issue 21's targets under it (~5 min
# with bench_delivery's outage run before it). BENCH_ARGS e.g. "--json build/bench.json --strict".
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || (sudo apt-get update -qq && sudo apt-get install -y -qq wrk)
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx) || (sudo apt-get update -qq && sudo apt-get install -y -qq nginx) \
	  || echo "bench: nginx could not be installed; its rows will say so"
	$(PY) -m loadtest.bench_delivery
	$(PY) -m loadtest.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis proxy/ingress/_compiled.c proxy/ingress/_compiled.*.so
