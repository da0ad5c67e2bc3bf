# Two commands matter: `make train` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/mnist1d_cnn.toml
STAMP := $(VENV)/.installed

.PHONY: venv test train bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# -n auto: one pytest worker per core (pytest-xdist): 18 min -> 11 min on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

# --overwrite: running the main job again moves the previous run aside (runs/NAME.old-<time>), never deletes it.
train: $(STAMP)
	$(BIN)/python scripts/train.py --config $(CONFIG) --overwrite

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.benchmark

# The documentation site (mkdocs.yml, docs/, notebooks/) into site/; --strict: a broken link or reference fails.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache site
