# Two commands from a fresh clone, with only Python (3.10+) and make installed:
#   make demo   set up .venv, train the `tiny` model on the embedded default corpus, sample from it
#   make test   set up .venv with the test extras, run the test suite (notebooks included)
# Each creates .venv itself and installs into it only what it needs; nothing outside the clone is touched.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_RUN ?= runs/demo
# torch is pinned first: this version's CPU wheel satisfies the `torch` extra without pulling a CUDA build
TORCH ?= torch==2.13.0
TEST_EXTRAS := dev,torch,plot,hf,mpi,text,datasets

.PHONY: demo test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the stamps record what was installed, and are redone when pyproject.toml changes
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(TEST_EXTRAS)]"
	touch $@ $(VENV)/.installed-run

demo: $(VENV)/.installed-run
	@# a second `make demo` continues (or just reuses) the run instead of refusing its checkpoints
	@if ls -d $(DEMO_RUN)/ckpt-* >/dev/null 2>&1; then \
		$(BIN)/fastformer train --resume --out $(DEMO_RUN); \
	else \
		$(BIN)/fastformer train --preset tiny --out $(DEMO_RUN); \
	fi
	$(BIN)/fastformer generate --checkpoint $(DEMO_RUN) --prompt "def " --max-new-tokens 300 --seed 0

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# regenerate docs/configuration.md from the config dataclasses (the tests check it is current)
docs: $(VENV)/.installed-run
	$(BIN)/python scripts/config_reference.py --write

clean:
	rm -rf $(VENV) $(DEMO_RUN)
