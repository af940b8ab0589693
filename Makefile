# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC overrides the torch requirement (default: the pinned CPU build this machine has on disk).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_DIR ?= .demo

.PHONY: install demo test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m fixtures.generate $(DEMO_DIR)
	$(VENV)/bin/mergelens compare $(DEMO_DIR)/finetune_a $(DEMO_DIR)/finetune_b --base $(DEMO_DIR)/base \
		--report $(DEMO_DIR)/report.html --json $(DEMO_DIR)/result.json

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.run

lint: install
	$(VENV)/bin/ruff check mergelens_mcp tests fixtures benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
