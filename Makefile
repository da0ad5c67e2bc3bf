# Two commands matter: `make train` (the main job) and `make test`; `make test-fast` is the inner loop.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/mnist1d_cnn.toml
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast train bench docs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# -n auto: one pytest worker per core (pytest-xdist); tests/conftest.py shares one JAX compilation
# cache between the workers and the processes they start. --dist loadgroup keeps each xdist_group
# (a file's module-scoped runs) on one worker. Durations: docs/benchmarks.md, "Test suite".
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# The tests not marked slow: the inner loop while you work. --dist load: none of them shares an
# expensive run, so spreading every test evenly over the workers is quicker than keeping groups.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist load -m "not slow"

# --overwrite: running the main job again moves the previous run aside (runs/NAME.old-<time>), never deletes it.
train: $(STAMP)
	$(BIN)/python scripts/train.py --config $(CONFIG) --overwrite

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.benchmark
	$(BIN)/python -m benchmarks.bench_first_step  # cold and warm first step, make train run twice

# The documentation site (mkdocs.yml, docs/, notebooks/) into site/; --strict: a broken link or reference fails.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) runs .pytest_cache site
