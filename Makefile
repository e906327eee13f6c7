# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on these machines. Users on GPUs install their CUDA build instead.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# tests/test_report.py opens the report page in Debian's Chromium through Playwright. `playwright install` is not
# used: it downloads a browser build from a CDN these machines cannot reach. Nothing to do where a Chromium is on
# PATH; without apt-get the browser tests skip (CI sets ZEROCONV_REQUIRE_BROWSER=1, which makes them fail instead).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "no chromium and no apt-get: the browser tests of tests/test_report.py will skip"; fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/zeroconv demo --output_dir demo-out

# Two test processes of one torch thread each (pytest-xdist): the tests are tiny models whose steps do not keep two
# threads busy, so two at once finish sooner; the passive OpenMP wait keeps the multi-process tests, which start
# more processes than there are cores, from spinning. TEST_WORKERS=0 runs them one by one.
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest tests -n $(TEST_WORKERS) --durations=20

bench: $(STAMP)
	$(BIN)/python -m zeroconv bench --config tiny

clean:
	rm -rf $(VENV) demo-out
