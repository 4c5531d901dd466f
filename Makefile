# m2cache: `make test` is what CI runs (.ci/run). Every target installs into .venv first (once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m pip
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo stress lint clean peers bench bench-quick trace-pages

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and explicitly, so the extras below never pull a different build; re-runs when
# pyproject.toml changes
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[test,bench,convert,serve]'
	touch $@
	@echo "m2cache is installed in $(VENV): run $(VENV)/bin/m2cache, or 'source $(VENV)/bin/activate' to have m2cache on your PATH"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/m2cache demo

# llama.cpp for the bench (optional): a source build, about 16 minutes on 2 cores; pip keeps the wheel
peers: install
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install 'llama-cpp-python>=0.3'

# the bigger-than-memory bench (writes its 7B-shaped model once under ~/.cache/m2cache)
BENCH_ARGS ?=
bench: install
	$(VENV)/bin/m2cache bench $(BENCH_ARGS)

bench-quick: install
	$(VENV)/bin/m2cache bench --quick $(BENCH_ARGS)

stress: install
	timeout 600 $(PY) -m pytest -q -m stress tests/stress $(PYTEST_ARGS)

lint: install
	@if $(PY) -m mypy --version >/dev/null 2>&1; then \
		$(PY) -m mypy runtime formats storage model actors; \
	else \
		echo "mypy is not installed in $(VENV): $(PIP) install mypy"; \
	fi

clean:
	rm -rf build .pytest_cache .hypothesis $(STAMP)

# the trace page (tools/trace.py --html) of a short real engine run, rendered in headless Chromium
# (installed with apt-get if missing) zoomed to a decode step; fails if the page reports a load error,
# and keeps the screenshot
.PHONY: trace-check
trace-check: install
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	M2CACHE_REQUIRE_CHROMIUM=1 M2CACHE_TRACE_SCREENSHOT=docs/results/trace_step_html.png \
		$(PY) -m pytest -q tests/test_trace_browser.py

# the trace pages of two short demo runs (pages are built here, never committed): build/trace/demo.html with the
# default policy, build/trace/prefetch.html with lookahead
trace-pages: install
	mkdir -p build/trace
	S=$$($(VENV)/bin/m2cache fetch smollm2) && \
	$(VENV)/bin/m2cache generate $$S "Why is the sky blue?" --max-new-tokens 16 --greedy --trace build/trace/demo.trace && \
	$(VENV)/bin/m2cache trace build/trace/demo.trace --html build/trace/demo.html && \
	$(VENV)/bin/m2cache generate $$S "Why is the sky blue?" --max-new-tokens 16 --greedy --lookahead --trace build/trace/prefetch.trace && \
	$(VENV)/bin/m2cache trace build/trace/prefetch.trace --html build/trace/prefetch.html
