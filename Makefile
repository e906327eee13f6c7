# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on these machines. Users on GPUs install their CUDA build instead.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/zeroconv demo --output_dir demo-out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m zeroconv bench --config tiny

clean:
	rm -rf $(VENV) demo-out
